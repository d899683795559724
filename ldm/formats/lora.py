"""LoRA files (Hu et al. 2021, "LoRA: Low-Rank Adaptation"): read, write and merge into weights.

Two layouts are in use. diffusers/PEFT (``pytorch_lora_weights.safetensors``):
``unet.<module path>.lora_A.weight`` (down, [rank, in]) and ``.lora_B.weight`` (up, [out, rank]);
the text encoder under ``text_encoder.text_model.<path>``; alpha, when not equal to the rank,
lives in the ``lora_adapter_metadata`` JSON of the safetensors header (diffusers >= 0.34). kohya /
A1111: ``lora_unet_<module_path_with_underscores>.lora_down.weight``, ``.lora_up.weight`` and a
scalar ``.alpha`` (``lora_te_`` for the text encoder). Either way a module's weight moves by
ΔW = scale · (alpha / rank) · up @ down (1x1 / kxk convolutions: up and down flattened to 2-D).
Modules are matched in underscore space, so one lookup serves both layouts; the text encoder's
``text_model.`` prefix (transformers < 5) is optional on both sides. Keys that match nothing are
reported, never dropped silently.
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
from ldm.formats.safe_load import load_state_dict, read_safetensors_header, save_state_dict

DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"
PARTS = ("unet", "text_encoder")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
TEXT_MODEL = "text_model."  # transformers < 5 nests CLIP under it; files keep it

# (down suffix, up suffix) of the diffusers/PEFT spellings, newest first
DIFFUSERS_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight")


@dataclass
class LoraModule:
    """One low-rank pair: ΔW = (alpha / rank) · up @ down for the module ``name`` of ``part``."""

    part: str  # "unet" or "text_encoder"
    name: str  # module path ("down_blocks.0....to_q") or kohya stem ("down_blocks_0_..._to_q")
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

    format: str  # "diffusers" or "kohya"
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
        """One line naming the keys that matched nothing (None when every key was used)."""
        bad = self.unmatched + self.mismatched
        if not bad:
            return None
        shown = ", ".join(bad[:limit]) + (
            f" and {len(bad) - limit} more" if len(bad) > limit else ""
        )
        return f"LoRA {self.source}: {len(bad)} keys matched nothing in the model: {shown}"


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
    """Read a diffusers/PEFT or kohya LoRA file (safe loader); the layout is detected from keys."""
    path = Path(path)
    state_dict = load_state_dict(path)
    metadata = _adapter_metadata(path) if path.suffix == ".safetensors" else {}
    kohya, left = _parse_kohya(state_dict, path)
    diffusers, unknown = _parse_diffusers({k: state_dict[k] for k in left}, metadata, path)
    if not kohya and not diffusers:
        raise CheckpointError(
            f"{path}: no LoRA weights found (expected diffusers/PEFT lora_A/lora_B or kohya "
            f"lora_down/lora_up keys; first key is {next(iter(state_dict), 'none')!r})"
        )
    layout = "kohya" if len(kohya) >= len(diffusers) else "diffusers"
    return LoraWeights(layout, kohya + diffusers, sorted(unknown), path)


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


def _parse_kohya(state_dict: dict, path: Path) -> tuple[list[LoraModule], list[str]]:
    """kohya pairs (``lora_unet_*`` / ``lora_te_*``) and the keys left for other parsers."""
    modules, used = [], set()
    down_suffix, up_suffix = KOHYA_SUFFIXES
    for key in state_dict:
        part = next((p for p, pre in KOHYA_PREFIX.items() if key.startswith(pre)), None)
        if part is None or not key.endswith(down_suffix):
            continue
        stem = key[: -len(down_suffix)]
        up_key, alpha_key = stem + up_suffix, stem + ".alpha"
        if up_key not in state_dict:
            continue  # reported as unknown
        alpha = state_dict.get(alpha_key)
        if alpha is not None and alpha.numel() != 1:
            raise CheckpointError(f"{path}: {alpha_key} is not a scalar")
        keys = [key, up_key] + ([alpha_key] if alpha is not None else [])
        used.update(keys)
        name = stem[len(KOHYA_PREFIX[part]) :]
        alpha = None if alpha is None else float(alpha)
        modules.append(_pair(part, name, state_dict[key], state_dict[up_key], alpha, keys, path))
    return modules, [k for k in state_dict if k not in used]


def _parse_diffusers(state_dict: dict, metadata: dict, path: Path):
    """diffusers/PEFT pairs (``unet.*`` / ``text_encoder.*``) and the keys nobody understood."""
    modules, used = [], set()
    for key in state_dict:
        part = next((p for p in PARTS if key.startswith(p + ".")), None)
        match = next(((d, u) for d, u in DIFFUSERS_SUFFIXES if key.endswith(d)), None)
        if part is None or match is None:
            continue
        stem = key[: -len(match[0])]
        up_key = stem + match[1]
        if up_key not in state_dict:
            continue
        name = stem[len(part) + 1 :]
        keys = [key, up_key]
        alpha_key = stem + ".alpha"  # old diffusers conversions of kohya files kept it here
        alpha = state_dict.get(alpha_key)
        if alpha is not None:
            keys.append(alpha_key)
            alpha = float(alpha.reshape(-1)[0])
        else:
            alpha = _metadata_alpha(metadata, part, name, state_dict[key].shape[0])
        used.update(keys)
        modules.append(_pair(part, name, state_dict[key], state_dict[up_key], alpha, keys, path))
    return modules, [k for k in state_dict if k not in used]


def _metadata_alpha(metadata: dict, part: str, name: str, rank: int) -> float | None:
    """PEFT LoraConfig fields (lora_alpha, alpha_pattern, use_rslora) -> this module's alpha."""
    config = {k[len(part) + 1 :]: v for k, v in metadata.items() if k.startswith(part + ".")}
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


def _flat(name: str) -> str:
    """A module path or kohya stem in underscore space, without the optional text_model prefix."""
    name = name.replace(".base_layer", "").replace(".", "_")
    return name.removeprefix("text_model_")


def module_index(model: torch.nn.Module) -> dict[str, tuple[str, torch.nn.Module]]:
    """Linear and Conv2d modules of ``model`` by underscore name -> (dotted path, module)."""
    index = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and ".lora_" not in name:
            index[_flat(name)] = (name.replace(".base_layer", ""), module)
    return index


@torch.no_grad()
def apply_lora(parts, lora: LoraWeights | str | os.PathLike, scale: float = 1.0) -> LoraReport:
    """Merge W += scale · (alpha / rank) · up @ down into parts.unet / .text_encoder in place."""
    if not isinstance(lora, LoraWeights):
        lora = load_lora(lora)
    report = LoraReport(str(lora.path or "(in memory)"), unmatched=list(lora.unknown))
    indexes = {p: module_index(m) for p in PARTS if (m := getattr(parts, p, None)) is not None}
    for pair in lora.modules:
        found = indexes.get(pair.part, {}).get(_flat(pair.name))
        if found is None:
            report.unmatched.extend(pair.keys)
            continue
        path, module = found
        weight = module.weight
        delta = pair.delta()  # [out, in · kh · kw]
        if delta.shape != (weight.shape[0], weight[0].numel()):
            report.mismatched.append(
                f"{pair.keys[0]} (LoRA {list(delta.shape)} vs weight {list(weight.shape)})"
            )
            continue
        weight.add_((scale * delta).reshape(weight.shape).to(weight.device, weight.dtype))
        report.matched.append(f"{pair.part}.{path}")
    return report


# --- writing ----------------------------------------------------------------------------------


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.detach().to("cpu", dtype or t.dtype).contiguous()


def save_diffusers_lora(
    modules: list[LoraModule], path: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """Write ``unet.<path>.lora_A/B.weight`` keys (what ``load_lora_weights`` reads), atomically.

    alpha / rank is folded into lora_B, so the file means the same to every reader: diffusers with
    or without adapter metadata, ComfyUI, and ``apply_lora`` all use alpha = rank.
    """
    state_dict, alphas = {}, {}
    for m in modules:
        stem = f"{m.part}.{TEXT_MODEL if m.part == 'text_encoder' else ''}{m.name}"
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
    modules: list[LoraModule], path: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """Write kohya/A1111 keys ``lora_unet_<path_with_underscores>.lora_down/.lora_up/.alpha``."""
    state_dict = {}
    ranks, alphas = set(), set()
    for m in modules:
        dotted = (TEXT_MODEL if m.part == "text_encoder" else "") + m.name
        stem = KOHYA_PREFIX[m.part] + dotted.replace(".", "_")
        alpha = float(m.rank if m.alpha is None else m.alpha)
        state_dict[f"{stem}.lora_down.weight"] = _cast(m.down, dtype)
        state_dict[f"{stem}.lora_up.weight"] = _cast(m.up, dtype)
        state_dict[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype or torch.float32)
        ranks.add(m.rank)
        alphas.add(alpha)
    metadata = {"ss_network_module": "networks.lora"}  # what kohya's tools look for
    if len(ranks) == 1 and len(alphas) == 1:
        metadata |= {"ss_network_dim": str(ranks.pop()), "ss_network_alpha": str(alphas.pop())}
    path = Path(path)
    save_state_dict(state_dict, path, metadata=metadata)
    return path
