"""``ldm convert SRC DST --to FORMAT``: between checkpoint formats, and between LoRA layouts.

Checkpoints (SD 1.x/2.x, SDXL base and refiner): SRC is a diffusers folder or an original single
file (.safetensors, or a .ckpt that loads with ``torch.load(weights_only=True)``);
``--to diffusers`` writes a folder, ``--to single-file`` one original-keyed .safetensors
(A1111/ComfyUI layout) whose metadata records its configs for ldm. What could not be read from a
single file (head counts, v-prediction) is printed, and ``--config`` / ``--prediction-type``
override it. LoRA: ``--to lora-kohya`` / ``lora-diffusers`` rewrites LoRA file SRC in kohya/A1111
names (``lora_unet_``, ``lora_te1_``/``lora_te2_``; SD3: original MMDiT names with q/k/v fused,
``lora_te3_``) or diffusers/PEFT names (``unet.`` or SD3's ``transformer.``, ``text_encoder.``,
``text_encoder_2.``) for the base model ``--model``; every key must apply (docs/lora.md).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ldm.errors import LdmError

CHECKPOINTS = ("diffusers", "single-file")
LORAS = ("lora-kohya", "lora-diffusers")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="diffusers folder, single file, or LoRA file")
    p.add_argument("dst", metavar="DST", help="output folder (diffusers) or .safetensors file")
    p.add_argument("--to", required=True, choices=CHECKPOINTS + LORAS, help="format of DST")
    p.add_argument(
        "--model", metavar="MODEL",
        help="with --to lora-*: the base model (folder or single file) the LoRA SRC is for",
    )  # fmt: skip
    p.add_argument(
        "--prediction-type", choices=("eps", "v"),
        help="what the network predicts (single files cannot say; SD 2.x default: v)",
    )  # fmt: skip
    p.add_argument(
        "--config", metavar="PATH",
        help="diffusers folder or model .yaml whose configs describe a single-file SRC (or MODEL)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"),
        help="dtype of the written weights (default: SRC's, when all its weights share one)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def run(args: argparse.Namespace) -> int:
    from ldm.formats.diffusers_folder import save_folder
    from ldm.formats.single_file import save_single_file
    from ldm.loading import load_model
    from ldm.models.bundled import resolve_model

    src, dst = resolve_model(args.src, "SRC"), Path(args.dst)  # a path, or a bundled name
    if dst.exists() and not args.overwrite:
        raise LdmError(f"{dst}: already exists (pass --overwrite to replace it)")
    if args.to != "diffusers" and dst.suffix != ".safetensors":
        raise LdmError(f"{dst}: --to {args.to} writes a .safetensors file")
    if args.to in LORAS:
        return _convert_lora(args, src, dst)
    if args.model is not None:
        raise LdmError("--model names the base model of a LoRA (--to lora-kohya/lora-diffusers)")
    stored = stored_dtype(src)
    dtype = args.dtype or stored  # fp16 in, fp16 out
    # nothing is computed: the stored dtype holds every weight exactly, in half the memory of fp32
    load_as = stored if stored and dtype == stored else "fp32"
    parts = load_model(src, "cpu", load_as, args.config, args.prediction_type)
    _print_inferred(parts)
    if args.to == "diffusers":
        save_folder(parts, dst, dtype=dtype, overwrite=args.overwrite)
    else:
        save_single_file(parts, dst, dtype=dtype, overwrite=args.overwrite)
    label = f"{args.to}, {parts.family.label}, {dtype or 'fp32'}"
    prediction = "flow" if parts.family.prediction_type == "flow" else parts.prediction_type
    print(f"wrote {dst} ({label}, prediction type {prediction})")
    return 0


def stored_dtype(path: Path) -> str | None:
    """The floating dtype of a safetensors file's (or folder's) weights: the one that holds 99 %
    of their elements (stray scalars such as OpenCLIP's fp32 logit_scale do not count); None if
    mixed, unknown (pickles) or fp64."""
    from ldm.formats.safe_load import read_safetensors_header

    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".safetensors" for f in files):
        return None
    counts: dict[str, int] = {}
    for f in files:
        for name, info in read_safetensors_header(f).items():
            if name != "__metadata__" and info["dtype"] in ("F16", "BF16", "F32", "F64"):
                counts[info["dtype"]] = counts.get(info["dtype"], 0) + math.prod(info["shape"])
    if not counts:
        return None
    top = max(counts, key=counts.get)
    names = {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}
    return names.get(top) if counts[top] >= 0.99 * sum(counts.values()) else None


def _print_inferred(parts) -> None:
    for key, value in parts.inferred.items():
        print(f"inferred {key}: {value}", file=sys.stderr)


def _convert_lora(args: argparse.Namespace, src: Path, dst: Path) -> int:
    from ldm.dtypes import to_dtype
    from ldm.formats.lora import convert_lora
    from ldm.loading import load_model

    if args.model is None:
        raise LdmError(f"--to {args.to}: pass --model, the base model the LoRA was made for")
    if not src.is_file():
        raise LdmError(f"{src}: --to {args.to} reads a LoRA file")
    # only the model's module names and weight shapes matter here: no fp32 copy
    load_as = stored_dtype(Path(args.model)) or "bf16"
    parts = load_model(args.model, "cpu", load_as, args.config, args.prediction_type)
    _print_inferred(parts)
    layout = args.to.removeprefix("lora-")
    dtype = to_dtype(args.dtype or stored_dtype(src), "--dtype")
    report = convert_lora(parts, src, dst, layout, dtype)
    print(f"wrote {dst} ({layout} LoRA, {len(report.matched)} modules of {parts.family.label})")
    return 0
