"""FLUX.1 LoRA files under the original transformer's names (kohya, ComfyUI) as well as diffusers'.

kohya (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``,
``lora_te1_`` CLIP-L, ``lora_te3_`` T5-XXL; sd-scripts networks/lora_flux.py) and ComfyUI
(``diffusion_model.double_blocks.0.img_attn.qkv``, ``text_encoders.t5xxl.transformer.``) name
BFL's modules; ldm's transformer has diffusers' names (``transformer.`` files). An original module
can be several of ours: the fused qkv is to_q / to_k / to_v stacked by rows, a single block's
``linear1`` is to_q / to_k / to_v / proj_mlp (widths w, w, w, 4w), so its pair is split by rows
of the up weight with the down weight shared; the final adaLN holds (shift, scale) where diffusers
has (scale, shift). The names come from the single-file table (original_flux.transformer_pairs),
so LoRA and checkpoint names cannot drift apart. Pairs are ``ldm.formats.lora.LoraModule``s.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from ldm.errors import LdmError
from ldm.formats.lora_names import flat, kohya_name, module_index, unet_config_dict
from ldm.formats.original_flux import transformer_pairs
from ldm.formats.safe_load import save_state_dict

# kohya (lora_te3_) and ComfyUI (t5xxl) name T5 as SD3's third encoder; FLUX holds it second
PART_ALIASES = {"text_encoder_3": "text_encoder_2"}
# diffusers' kohya reader ignores these modules' alphas (final_layer: "TODO: alphas"): ldm
# writes them with alpha = rank and the scale folded into lora_up, which every reader agrees on
_FOLDED = ("final_layer.linear", "final_layer.adaLN_modulation.1")


def is_flux(config) -> bool:
    """A FLUX.1 transformer config (ldm's FluxConfig or its config.json)."""
    return config is not None and "num_single_layers" in unet_config_dict(config)


def flux_original_modules(config) -> dict[str, tuple[object, tuple[str, ...]]]:
    """Original module path -> (op, diffusers module paths) for every FLUX Linear.

    op "" (the same weight), "swap" (row halves swapped) or row counts (a fused weight: the
    diffusers weights stacked by rows in that order); the q/k norms (no LoRA) are left out.
    """
    pairs = transformer_pairs(unet_config_dict(config))
    return {
        original: (op, names) for names, original, op in pairs if not original.endswith(".scale")
    }


def original_index(model: torch.nn.Module, config) -> dict[str, list[tuple[str, object, tuple]]]:
    """Original names (underscore space) -> [(diffusers path, module, rows)], ``rows`` the slices
    of the original weight's rows that make the module's weight, in order (() = all of it)."""
    index = {}
    for original, (op, paths) in flux_original_modules(config).items():
        modules = [model.get_submodule(p) for p in paths]
        if isinstance(op, tuple):
            ends = torch.tensor(op).cumsum(0).tolist()
            rows = [(slice(end - size, end),) for size, end in zip(op, ends)]
        elif op == "swap":  # original (shift, scale) -> diffusers (scale, shift)
            out = modules[0].weight.shape[0]
            rows = [(slice(out // 2, out), slice(0, out // 2))]
        else:
            rows = [()]
        index[flat(original)] = list(zip(paths, modules, rows, strict=True))
    return index


def flux_indexes(parts) -> dict[str, dict[str, list]]:
    """What ``lora._indexes`` holds for a FLUX model: per part, underscore name -> [(path,
    module, rows)]; the transformer under its diffusers and its original names; T5 also as
    "text_encoder_3", the part kohya's ``lora_te3_`` and ComfyUI's ``t5xxl`` keys are read as."""
    out = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        if (module := getattr(parts, part, None)) is None:
            continue
        out[part] = {name: [(path, m, ())] for name, (path, m) in module_index(module).items()}
        if part == "unet":
            out[part] |= original_index(module, module.config)
    if "text_encoder_2" in out:
        out["text_encoder_3"] = out["text_encoder_2"]
    return out


# ---------------------------------------------------------------- writing


def fuse_original(modules: list, config) -> list:
    """The transformer's pairs renamed to BFL's modules (kohya's, ComfyUI's names).

    Pairs of one fused weight become one pair: each member's down and up in its own block of
    R rank columns (R the largest member rank; absent members and short ranks padded with
    zeros), each up times its scale over the first's, alpha = that scale x the fused rank, so
    ΔW is exact. Equal blocks are what diffusers' kohya reader splits back exactly (its
    "sparse" path chunks the down weight evenly). Swapped adaLN halves are swapped back.
    """
    table = flux_original_modules(config)
    where = {
        p: (original, k) for original, (_, paths) in table.items() for k, p in enumerate(paths)
    }
    groups: dict[str, dict[int, object]] = {}
    out = [m for m in modules if m.part != "unet"]
    for m in modules:
        if m.part != "unet":
            continue
        if m.name not in where:
            raise LdmError(f"LoRA: transformer module {m.name!r} has no FLUX original name")
        original, k = where[m.name]
        groups.setdefault(original, {})[k] = m
    for original, members in groups.items():
        op, first = table[original][0], next(iter(members.values()))
        if isinstance(op, tuple):
            out.append(_fuse(original, members, op))
        elif op == "swap":
            out.append(replace(first, name=original, up=first.up.roll(first.up.shape[0] // 2, 0)))
        else:
            out.append(replace(first, name=original))
    return out


def _fuse(name: str, members: dict, sizes: tuple) -> object:
    """Pairs at positions ``members`` of a weight stacked from blocks of ``sizes`` rows -> one."""
    order = sorted(members)
    ref = members[order[0]]
    block = max(m.rank for m in members.values())
    width = ref.down.flatten(1).shape[1]
    up = torch.zeros(sum(sizes), len(sizes) * block)  # [Σ rows, blocks · R]
    down = torch.zeros(len(sizes) * block, width)  # [blocks · R, in]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    for k in order:
        m = members[k]
        cols = slice(k * block, k * block + m.rank)
        up[starts[k] : starts[k] + sizes[k], cols] = m.up.flatten(1).float() * (m.scale / ref.scale)
        down[cols] = m.down.flatten(1).float()
    keys = [key for k in order for key in members[k].keys]
    return replace(ref, name=name, down=down.to(ref.down.dtype), up=up.to(ref.up.dtype),
                   alpha=ref.scale * len(sizes) * block, keys=keys)  # fmt: skip


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.detach().to("cpu", dtype or t.dtype).contiguous()


def flux_lora_state_dict(modules: list, config, layout: str = "kohya", dtype=None):
    """(state dict, metadata) of FLUX pairs named by module path (part "unet", "text_encoder"
    CLIP-L, "text_encoder_2" T5-XXL) in ``layout``:

    "kohya": ``lora_unet_<BFL path>`` with q/k/v (and single blocks' MLP input) fused,
    ``lora_te1_`` CLIP-L, ``lora_te3_`` T5, ``.alpha`` per pair (sd-scripts networks/lora_flux).
    "diffusers": ``transformer.<path>`` / ``text_encoder.text_model.<path>`` lora_A / lora_B with
    alpha / rank folded into lora_B (diffusers' FluxPipeline reads both; T5 pairs, as
    ``text_encoder_2.``, only ldm reads).
    """
    c = unet_config_dict(config)
    if layout == "kohya":
        return _kohya(fuse_original(modules, c), c, dtype)
    if layout != "diffusers":
        raise LdmError(f"LoRA layout {layout!r}: choose kohya or diffusers")
    state_dict, alphas = {}, set()
    for m in modules:
        part = PART_ALIASES.get(m.part, m.part)
        if part == "unet":
            stem = f"transformer.{m.name}"
        elif part == "text_encoder":  # transformers' CLIPTextModel nests under text_model
            stem = f"text_encoder.text_model.{m.name.removeprefix('text_model.')}"
        else:
            stem = f"{part}.{m.name}"
        if f"{stem}.lora_A.weight" in state_dict:
            raise LdmError(f"LoRA: two pairs for the module {stem!r}")
        state_dict[f"{stem}.lora_A.weight"] = _cast(m.down, dtype)
        state_dict[f"{stem}.lora_B.weight"] = _cast(m.up.float() * m.scale, dtype)
        alphas.add(m.alpha)
    note = {"alpha_folded_into_lora_B": True, "trained_alpha": sorted(alphas - {None})}
    return state_dict, {"format": "pt", "ldm_lora": json.dumps(note)}


def _kohya(modules: list, config: dict, dtype) -> tuple[dict, dict]:
    state_dict, ranks, alphas = {}, set(), set()
    for m in modules:
        part = {"text_encoder_2": "text_encoder_3"}.get(m.part, m.part)  # T5: lora_te3_
        stem = kohya_name(part, m.name, True, {m.name: m.name} if part == "unet" else None)
        if f"{stem}.alpha" in state_dict:
            raise LdmError(f"LoRA: two pairs for the module {stem!r}")
        up, alpha = m.up, float(m.rank if m.alpha is None else m.alpha)
        if m.name in _FOLDED:
            up, alpha = m.up.float() * m.scale, float(m.rank)
        state_dict[f"{stem}.lora_down.weight"] = _cast(m.down, dtype)
        state_dict[f"{stem}.lora_up.weight"] = _cast(up, dtype)
        state_dict[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype or torch.float32)
        ranks.add(m.rank)
        alphas.add(alpha)
    # sd-scripts library/flux_utils.MODEL_VERSION_FLUX_V1, sai_model_spec ARCH_FLUX_1_*
    arch = "flux-1-dev" if config.get("guidance_embeds") else "flux-1-schnell"
    metadata = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1",
                "modelspec.architecture": f"{arch}/lora"}  # fmt: skip
    if len(ranks) == 1 and len(alphas) == 1:
        metadata |= {"ss_network_dim": str(ranks.pop()), "ss_network_alpha": str(alphas.pop())}
    return state_dict, metadata


def save_flux_lora(
    modules: list, path: str | os.PathLike, config, layout: str = "kohya", dtype=None
) -> Path:
    """Write FLUX pairs (see ``flux_lora_state_dict``) as a safetensors file, atomically."""
    state_dict, metadata = flux_lora_state_dict(modules, config, layout, dtype)
    path = Path(path)
    save_state_dict(state_dict, path, metadata=metadata)
    return path
