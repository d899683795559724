"""``--from-png``: the settings of an image ldm (or A1111) made, read back as txt2img flags.

ldm's JSON record wins over the A1111 ``parameters`` text; the model and LoRA paths are used only
where they still exist, and flags given explicitly override all of it (see ``txt2img._settings``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ldm.cli.flow_args import SKIP_LAYER_KEYS
from ldm.errors import LdmError

# record key -> flag dest, for --from-png
FROM_RECORD = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps",
    "guidance_scale": "guidance_scale", "guidance_rescale": "guidance_rescale",
    "sampler": "sampler", "schedule": "schedule", "eta": "eta", "height": "height",
    "width": "width", "clip_skip": "clip_skip", "seed": "seed", "strength": "strength",
    "denoising_strength": "strength",  # the infotext's name
    "refiner_switch_at": "refiner_switch_at", "shift": "shift", "true_cfg_scale": "true_cfg_scale",
    **{k: k for k in SKIP_LAYER_KEYS},
}  # fmt: skip


def settings_from_png(path: str, init_image: str | None, mask: str | None = None) -> dict:
    """The txt2img settings recorded in a PNG (ldm's JSON record, else A1111's parameters):
    flag dest -> value, plus model/refiner paths that exist, the LoRAs to merge again, and an
    outpainted image's pads. The images are not recorded: img2img and inpainting need them given
    again (without its mask an inpainted image would silently be redone as img2img)."""
    from ldm.infotext import parse_infotext, read_png_metadata

    if not Path(path).is_file():
        raise LdmError(f"--from-png {path}: no such file")
    infotext, record = read_png_metadata(path)
    if not record and infotext:
        record = parse_infotext(infotext)
    if not record:
        raise LdmError(f"--from-png {path}: the PNG has no ldm record or A1111 parameters")
    mode = record.get("mode", "txt2img")
    if mode != "txt2img" and not init_image:
        raise LdmError(f"--from-png {path}: made by {mode}; give its --init-image too")
    if mode == "inpaint" and not mask:
        raise LdmError(f"--from-png {path}: made by inpaint; give its --mask too")
    out = {flag: record[key] for key, flag in FROM_RECORD.items() if record.get(key) is not None}
    if mode == "outpaint" and record.get("outpaint"):
        out["outpaint"] = str(record["outpaint"])  # L,R,U,D: the canvas is made again from them
    for key in ("model", "refiner"):
        path = record.get(f"{key}_path")
        if path and Path(path).exists():
            out[key] = path
    out["lora"], missing = [], []
    for lora in record.get("loras") or []:  # a LoRA model's own, and --lora files
        path = lora.get("path") if isinstance(lora, dict) else None
        if path and Path(path).is_file():
            out["lora"].append(f"{path}:{lora.get('scale', 1.0)}")
        else:
            missing.append(str(lora.get("name") if isinstance(lora, dict) else lora))
    if missing:
        print(f"ldm: warning: --from-png: LoRA {', '.join(missing)} not found; pass it with "
              "--lora to re-render the same image", file=sys.stderr)  # fmt: skip
    if record.get("micro_conditioning"):
        out["micro"] = {k: v for k, v in record["micro_conditioning"].items() if v is not None}
    return out
