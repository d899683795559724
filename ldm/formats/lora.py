"""LoRA files (Hu et al. 2021, "LoRA: Low-Rank Adaptation"): read, write and merge into weights.

A pair (down, up) and an optional scalar alpha move one module's weight by
ΔW = scale · (alpha / rank) · up @ down (1x1 / kxk convolutions: up and down flattened to 2-D).
Layouts read: diffusers/PEFT (``unet.<path>.lora_A.weight`` / ``.lora_B.weight``; alpha in the
``lora_adapter_metadata`` JSON of the header, diffusers >= 0.34), kohya / A1111
(``lora_unet_<path_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``;
``lora_te1_`` / ``lora_te2_`` for SDXL's two text encoders, sgm block names for SDXL's U-Net) and
ComfyUI's (``diffusion_model.<sgm path>``); SD3's transformer under diffusers' names
(``transformer.``) and the original MMDiT's (kohya, ComfyUI), whose fused qkv pair is split by
rows onto to_q / to_k / to_v; lora_names.py says which module a key names. Keys that match nothing
are reported, never dropped silently.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.errors import CheckpointError, LdmError
from ldm.formats.lora_flux import flux_indexes, is_flux, save_flux_lora
from ldm.formats.lora_names import (
    PARTS,
    TEXT_MODEL,
    diffusers_name,
    flat,
    is_sd3,
    is_sdxl,
    kohya_name,
    module_index,
    sgm_names,
    split_key,
)
from ldm.formats.lora_sd3 import fuse_original, original_index, sd3_model_type
from ldm.formats.safe_load import load_state_dict, read_safetensors_header, save_state_dict

__all__ = ["TEXT_MODEL", "module_index"]  # re-exported for ldm.train.lora and older callers
DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class LoraModule:
    """One low-rank pair: ΔW = (alpha / rank) · up @ down for the module ``name`` of ``part``."""

    part: str  # "unet" (the latent network), "text_encoder", "text_encoder_2", "text_encoder_3"
    name: str  # module path ("down_blocks.0....to_q") or as the file spells it (kohya stem)
    down: torch.Tensor  # lora_A / lora_down: [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # lora_B / lora_up: [out, rank] or [out, rank, 1, 1]
    alpha: float | None = None  # None: alpha = rank (scale 1)
    keys: list[str] = field(default_factory=list)  # the file keys it came from

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """(alpha / rank) · up @ down as a 2-D [out, in · kh · kw] float32 matrix."""
        return self.scale * (self.up.flatten(1).float() @ self.down.flatten(1).float())


@dataclass
class LoraWeights:
    """A parsed LoRA file: its layout, its low-rank pairs, and the keys that were not LoRA."""

    format: str  # "diffusers", "kohya" or "comfyui"
    modules: list[LoraModule]
    unknown: list[str] = field(default_factory=list)  # keys no parser understood
    path: Path | None = None


@dataclass
class LoraReport:
    """What ``apply_lora`` did: modules changed, and file keys that changed nothing."""

    source: str
    matched: list[str] = field(default_factory=list)  # "unet.down_blocks.0....to_q"
    unmatched: list[str] = field(default_factory=list)  # file keys naming no module of the model
    mismatched: list[str] = field(default_factory=list)  # "key: why" (shape does not fit)

    def warning(self, limit: int = 8) -> str | None:
        """One line naming the keys that changed nothing (None when every key was used)."""
        bad = self.unmatched + self.mismatched
        if not bad:
            return None
        shown = ", ".join(bad[:limit]) + (
            f" and {len(bad) - limit} more" if len(bad) > limit else ""
        )
        what = [f"{_count(len(self.unmatched), 'key')} matched nothing in the model"] * bool(
            self.unmatched
        )
        what += [f"{_count(len(self.mismatched), 'pair')} did not fit its weight"] * bool(
            self.mismatched
        )
        return f"LoRA {self.source}: {' and '.join(what)}: {shown}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def parse_lora_arg(spec: str) -> tuple[Path, float]:
    """``FILE[:SCALE]`` (the ``--lora`` flag) -> (path, scale); a path may itself hold colons."""
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            return Path(spec), 1.0
        if not math.isfinite(scale):
            raise LdmError(f"--lora {spec}: scale {tail!r} is not a finite number")
        return Path(path), scale
    return Path(spec), 1.0


# --- reading ----------------------------------------------------------------------------------


def load_lora(path: str | os.PathLike) -> LoraWeights:
    """Read a LoRA file of any layout lora_names.py knows (safe loader); pairs keep file names."""
    path = Path(path)
    state_dict = load_state_dict(path)
    metadata = _adapter_metadata(path) if path.suffix == ".safetensors" else {}
    modules, layouts, used = [], [], set()
    for key in state_dict:
        found = split_key(key)
        if found is None or found[3] not in state_dict:
            continue  # not a LoRA down weight, or one without its up weight: reported as unknown
        part, name, layout, up_key, stem = found
        keys, alpha_key = [key, up_key], stem + ".alpha"
        alpha = state_dict.get(alpha_key)
        if alpha is not None:
            if alpha.numel() != 1:
                raise CheckpointError(f"{path}: {alpha_key} is not a scalar")
            keys.append(alpha_key)
            alpha = float(alpha.reshape(()))
        elif layout == "diffusers":  # metadata keys start with the file's prefix ("transformer")
            prefix = stem[: len(stem) - len(name)].rstrip(".")
            alpha = _metadata_alpha(metadata, prefix, name, state_dict[key].shape[0])
        used.update(keys)
        layouts.append(layout)
        modules.append(_pair(part, name, state_dict[key], state_dict[up_key], alpha, keys, path))
    if not modules:
        raise CheckpointError(
            f"{path}: no LoRA weights found (expected diffusers/PEFT lora_A/lora_B or kohya "
            f"lora_down/lora_up keys; first key is {next(iter(state_dict), 'none')!r})"
        )
    layout = max(dict.fromkeys(layouts), key=layouts.count)  # the most common; ties: first seen
    return LoraWeights(layout, modules, sorted(k for k in state_dict if k not in used), path)


def _adapter_metadata(path: Path) -> dict:
    """diffusers' ``lora_adapter_metadata``: {"unet.lora_alpha": 8, "unet.r": 4, ...} or {}."""
    raw = read_safetensors_header(path).get("__metadata__", {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{path}: lora_adapter_metadata is not valid JSON") from None
    return data if isinstance(data, dict) else {}


def _pair(part, name, down, up, alpha, keys, path) -> LoraModule:
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
        raise CheckpointError(
            f"{path}: {keys[0]} has shape {list(down.shape)} but its up weight {list(up.shape)}; "
            "they do not form a low-rank pair"
        )
    return LoraModule(part, name, down, up, alpha, keys)


def _metadata_alpha(metadata: dict, prefix: str, name: str, rank: int) -> float | None:
    """PEFT LoraConfig fields (lora_alpha, alpha_pattern, use_rslora) -> this module's alpha."""
    config = {k[len(prefix) + 1 :]: v for k, v in metadata.items() if k.startswith(prefix + ".")}
    if "lora_alpha" not in config:
        return None
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", name):  # PEFT's rule: a suffix of the path
            alpha = float(value)
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(rank)
    return alpha


# --- applying ---------------------------------------------------------------------------------


def _indexes(parts) -> dict[str, dict[str, list]]:
    """Per part, underscore name -> [(module path, module, rows)]: ``rows`` () for a whole
    weight, else the slices of the file's ΔW rows that module takes (SD3's original names)."""
    if is_flux(getattr(getattr(parts, "unet", None), "config", None)):
        return flux_indexes(parts)  # FLUX.1: lora_flux.py (BFL names; T5 is its 2nd encoder)
    out = {}
    for part in PARTS:
        if (module := getattr(parts, part, None)) is None:
            continue
        config = getattr(module, "config", None) if part == "unet" else None
        sd3 = is_sd3(config)
        index = module_index(module, None if sd3 else config)  # U-Nets: sgm names too
        out[part] = {name: [(path, m, ())] for name, (path, m) in index.items()}
        if sd3:
            out[part] |= original_index(module, config)
    return out


def resolve_lora(parts, lora: LoraWeights | str | os.PathLike):
    """Match every pair to modules of ``parts``: ([(pair named by module path, module)], report).

    The returned pairs carry the module's dotted path as their name (ready for the writers);
    a pair on a fused original module (SD3's qkv) becomes one pair per module, its up weight
    split by rows and its down weight shared. Pairs naming no module, or whose ΔW does not fit
    the weights' shapes, go to the report.
    """
    if not isinstance(lora, LoraWeights):
        lora = load_lora(lora)
    report = LoraReport(str(lora.path or "(in memory)"), unmatched=list(lora.unknown))
    indexes = _indexes(parts)
    resolved = []
    for pair in lora.modules:
        part = pair.part
        if part == "text_encoder" and part not in indexes:
            part = "text_encoder_2"  # SDXL refiner: bigG alone; ComfyUI gives it lora_te_ keys
        targets = indexes.get(part, {}).get(flat(pair.name))
        if targets is None:
            report.unmatched.extend(pair.keys)
            continue
        weight = targets[0][1].weight
        out_in = (pair.up.shape[0], pair.down[0].numel())  # ΔW is [out, in · kh · kw]
        fits = (sum(m.weight.shape[0] for _, m, _ in targets), weight[0].numel())
        if out_in != fits:
            report.mismatched.append(
                f"{pair.keys[0]} (LoRA {list(out_in)} vs weight {list(weight.shape)}"
                + (f" x {len(targets)})" if len(targets) > 1 else ")")
            )
            continue
        for path, module, rows in targets:
            named = _rows_of(pair, part, path, rows, len(targets) > 1)
            if named is not None:
                resolved.append((named, module))
                report.matched.append(f"{part}.{path}")
    return resolved, report


def _rows_of(pair: LoraModule, part: str, path: str, rows: tuple, split: bool):
    """The pair for module ``path``: rows ``rows`` of ΔW (all for ()), i.e. of the up weight.

    A split's rank columns that are zero in its rows are dropped (exact: they add nothing), so a
    fused pair that stacks three pairs (kohya's split_qkv files, ldm's) gives them back, alpha
    rescaled to keep alpha / rank; None for a module whose rows are all zero when others' are
    not (a fused pair written without it: to_q and to_v trained, to_k not).
    """
    down, up, alpha = pair.down, pair.up, pair.alpha
    if rows:
        up = torch.cat([up[s] for s in rows])
    if split:
        used = up.flatten(1).ne(0).any(0)  # [rank]
        if not used.any() and pair.up.ne(0).any():
            return None
        if 0 < int(used.sum()) < pair.rank:
            down, up, alpha = down[used], up[:, used], pair.scale * int(used.sum())
    return LoraModule(part, path, down, up, alpha, pair.keys)


@torch.no_grad()
def apply_lora(parts, lora: LoraWeights | str | os.PathLike, scale: float = 1.0) -> LoraReport:
    """Merge W += scale · (alpha / rank) · up @ down into the parts' modules, in place."""
    resolved, report = resolve_lora(parts, lora)
    for pair, module in resolved:
        weight = module.weight
        delta = scale * pair.delta()  # [out, in · kh · kw]
        weight.add_(delta.reshape(weight.shape).to(weight.device, weight.dtype))
    return report


def convert_lora(parts, src, dst: str | os.PathLike, layout: str, dtype=None) -> LoraReport:
    """Rewrite LoRA file ``src`` for ``parts``' model as ``layout`` "kohya" or "diffusers".

    Every key must apply to the model (a converted file that lost keys would hide them).
    """
    resolved, report = resolve_lora(parts, src)
    if report.warning():
        raise LdmError(report.warning() + " (not converted)")
    modules = [pair for pair, _ in resolved]
    if is_flux(parts.unet.config):  # FLUX.1: lora_flux.py writes both layouts
        save_flux_lora(modules, dst, parts.unet.config, layout, dtype)
    elif layout == "kohya":
        save_kohya_lora(modules, dst, dtype, unet_config=parts.unet.config)
    elif layout == "diffusers":
        save_diffusers_lora(modules, dst, dtype)
    else:
        raise LdmError(f"LoRA layout {layout!r}: choose kohya or diffusers")
    return report


# --- writing ----------------------------------------------------------------------------------


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.detach().to("cpu", dtype or t.dtype).contiguous()


def save_diffusers_lora(
    modules: list[LoraModule], path: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """Write ``unet.<path>.lora_A/B.weight`` keys (what ``load_lora_weights`` reads), atomically.

    SD3's transformer pairs as ``transformer.<path>`` (StableDiffusion3Pipeline's names);
    ``text_encoder.`` / ``text_encoder_2.`` pairs keep transformers' ``text_model.`` level.
    alpha / rank is folded into lora_B, so the file means the same to every reader: diffusers with
    or without adapter metadata and ``apply_lora`` use alpha = rank. ComfyUI skips this layout's
    U-Net attention pairs (it maps only the ``processor.`` spelling): ComfyUI and A1111 users take
    the kohya file ldm writes beside it (docs/lora.md).
    """
    state_dict, alphas = {}, {}
    for m in modules:
        stem = diffusers_name(m.part, m.name)
        state_dict[f"{stem}.lora_A.weight"] = _cast(m.down, dtype)
        state_dict[f"{stem}.lora_B.weight"] = _cast(m.up.float() * m.scale, dtype)
        alphas[stem] = m.alpha
    note = {
        "alpha_folded_into_lora_B": True,
        "trained_alpha": sorted(set(alphas.values()) - {None}),
    }
    path = Path(path)
    save_state_dict(state_dict, path, metadata={"format": "pt", "ldm_lora": json.dumps(note)})
    return path


def save_kohya_lora(
    modules: list[LoraModule],
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    unet_config=None,
) -> Path:
    """Write kohya/A1111 keys ``<stem>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.

    Stems as kohya's networks/lora.py writes them: SD 1.x/2.x ``lora_unet_<diffusers path>`` and
    ``lora_te_``; SDXL (``unet_config`` with text_time, or a text_encoder_2 pair)
    ``lora_unet_<sgm path>`` (``input_blocks_4_1_...``), ``lora_te1_`` and ``lora_te2_``; SD3
    (an SD3 transformer config) as networks/lora_sd3.py: ``lora_unet_<original path>`` with q, k,
    v fused (``joint_blocks_0_x_block_attn_qkv``), ``lora_te1_`` / ``lora_te2_`` / ``lora_te3_``.
    """
    if is_flux(unet_config):  # FLUX.1: BFL names, lora_te3_ for T5 (lora_flux.py)
        return save_flux_lora(modules, path, unet_config, "kohya", dtype)
    sd3 = is_sd3(unet_config)
    sdxl = sd3 or (unet_config is not None and is_sdxl(unet_config))
    sdxl = sdxl or any(m.part in ("text_encoder_2", "text_encoder_3") for m in modules)
    renames = None
    if sd3:
        modules = fuse_original(modules, unet_config)
        renames = {m.name: m.name for m in modules if m.part == "unet"}
    elif sdxl and unet_config is not None:
        renames = sgm_names(unet_config, [m.name for m in modules if m.part == "unet"])
    state_dict, ranks, alphas = {}, set(), set()
    for m in modules:
        stem = kohya_name(m.part, m.name, sdxl, renames)
        if f"{stem}.alpha" in state_dict:
            raise LdmError(f"LoRA: two pairs for the module {stem!r}")
        alpha = float(m.rank if m.alpha is None else m.alpha)
        state_dict[f"{stem}.lora_down.weight"] = _cast(m.down, dtype)
        state_dict[f"{stem}.lora_up.weight"] = _cast(m.up, dtype)
        state_dict[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype or torch.float32)
        ranks.add(m.rank)
        alphas.add(alpha)
    metadata = {"ss_network_module": "networks.lora_sd3" if sd3 else "networks.lora"}
    if len(ranks) == 1 and len(alphas) == 1:
        metadata |= {"ss_network_dim": str(ranks.pop()), "ss_network_alpha": str(alphas.pop())}
    if sd3:  # sd-scripts: sd3_utils.analyze_state_dict_state's model_type, sai_model_spec
        version = sd3_model_type(unet_config)
        metadata |= {
            "ss_base_model_version": version,
            "modelspec.architecture": f"stable-diffusion-3-{version}/lora",
        }
    elif sdxl:  # A1111 and kohya read the base model from these (sd-scripts library/sai_model_spec)
        metadata |= {
            "ss_base_model_version": "sdxl_base_v1-0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        }
    path = Path(path)
    save_state_dict(state_dict, path, metadata=metadata)
    return path
