"""SD3 LoRA files under the original MMDiT's module names (kohya, ComfyUI) as well as diffusers'.

kohya (``lora_unet_joint_blocks_0_x_block_attn_qkv``, sd-scripts networks/lora_sd3.py) and ComfyUI
(``diffusion_model.joint_blocks.0.x_block.attn.qkv``) name Stability's original MMDiT modules;
ldm's transformer has diffusers' names. An original module can be several of ours: the fused qkv
is to_q / to_k / to_v (add_q/k/v_proj in the context stream) stacked by rows, so its LoRA pair is
split by rows of the up weight with the down weight shared; and two adaLN projections hold
(shift, scale) where diffusers has (scale, shift). The names come from the single-file table
(original_sd3.py); kohya's are checked against sd-scripts' own network in the tests.
Pairs are ``ldm.formats.lora.LoraModule``s, handled through ``dataclasses.replace``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ldm.errors import LdmError
from ldm.formats.lora_names import flat, unet_config_dict
from ldm.formats.original_sd3 import transformer_pairs


def sd3_original_modules(config) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Original MMDiT module path -> (op, diffusers paths) for an SD3 transformer config.

    The single-file table (``original_sd3.transformer_pairs``), so LoRA and checkpoint names
    cannot drift apart. op "" (one module, same weight), "qkv" (to_q, to_k, to_v: the rows of
    the fused weight, in thirds) or "swap" (the two row halves swapped: the last block's context
    adaLN and the final adaLN).
    """
    c = unet_config_dict(config)
    pairs = transformer_pairs(c["num_layers"], tuple(c.get("dual_attention_layers") or ()))
    return {original: (op, names) for names, original, op in pairs if original != "pos_embed"}


def original_index(
    model: torch.nn.Module, config
) -> dict[str, list[tuple[str, torch.nn.Module, tuple]]]:
    """SD3: original module names (underscore space) -> [(diffusers path, module, rows)], where
    ``rows`` are the slices of the original weight's rows that make the module's weight (in
    order), or () when it is the whole weight."""
    index = {}
    for original, (how, paths) in sd3_original_modules(config).items():
        modules = [model.get_submodule(p) for p in paths]
        out = modules[0].weight.shape[0]
        if how == "qkv":
            rows = [(slice(k * out, (k + 1) * out),) for k in range(len(paths))]
        elif how == "swap":  # original (shift, scale) -> diffusers (scale, shift)
            rows = [(slice(out // 2, out), slice(0, out // 2))]
        else:
            rows = [()]
        index[flat(original)] = list(zip(paths, modules, rows, strict=True))
    return index


def sd3_model_type(config) -> str:
    """kohya's name for an SD3 transformer: "medium", "5-medium" (dual attention) or "5-large"."""
    c = unet_config_dict(config)
    if not c.get("qk_norm"):
        return "medium"
    return "5-medium" if c.get("dual_attention_layers") else "5-large"


def fuse_original(modules: list, config) -> list:
    """SD3: the network's pairs renamed to the original MMDiT modules (kohya's, ComfyUI's).

    to_q / to_k / to_v pairs become one pair on the fused qkv weight: the downs stacked, the ups
    placed block-diagonally (what sd-scripts writes with split_qkv), each up times its scale over
    the first's, and alpha = that scale x the summed rank, so ΔW stays exact; an absent one
    leaves zero rows. Swapped adaLN halves are swapped back.
    """
    table = sd3_original_modules(config)
    where = {}  # diffusers path -> (original path, how, position in the fused weight)
    for original, (how, paths) in table.items():
        where |= {p: (original, how, k) for k, p in enumerate(paths)}
    groups: dict[str, tuple[str, dict[int, Any]]] = {}
    out = [m for m in modules if m.part != "unet"]
    for m in modules:
        if m.part != "unet":
            continue
        if m.name not in where:
            raise LdmError(f"LoRA: transformer module {m.name!r} has no original name")
        original, how, k = where[m.name]
        groups.setdefault(original, (how, {}))[1][k] = m
    for original, (how, members) in groups.items():
        first = next(iter(members.values()))
        if how == "qkv":
            out.append(_fuse_qkv(original, members, len(table[original][1])))
        elif how == "swap":
            half = first.up.shape[0] // 2
            out.append(replace(first, name=original, up=first.up.roll(half, 0)))
        else:
            out.append(replace(first, name=original))
    return out


def _fuse_qkv(name: str, members: dict[int, Any], count: int) -> Any:
    """Pairs at positions ``members`` of a fused weight of ``count`` equal row blocks -> one."""
    order = sorted(members)
    first = members[order[0]]
    rows, scale = first.up.shape[0], first.scale
    rank = sum(members[k].rank for k in order)
    up = torch.zeros(count * rows, rank, dtype=torch.float32)  # [count · out, Σ rank]
    col = 0
    for k in order:
        m = members[k]
        up[k * rows : (k + 1) * rows, col : col + m.rank] = m.up.flatten(1).float() * (
            m.scale / scale
        )
        col += m.rank
    down = torch.cat([members[k].down for k in order])  # [Σ rank, in]
    keys = [key for k in order for key in members[k].keys]
    return replace(first, name=name, down=down, up=up.to(first.up.dtype), alpha=scale * rank,
                   keys=keys)  # fmt: skip
