"""Key tables between diffusers names and original (CompVis / A1111 / ComfyUI / sgm) names.

One table of (diffusers prefix, original prefix) pairs per part, built from the architecture, so
that loading and exporting cannot drift apart (tests check it against diffusers' converters).
The text towers are in ldm.formats.original_text.
"""

from __future__ import annotations

import re

from ldm.errors import CheckpointError
from ldm.models.families import UNET_PREFIX

UNET = UNET_PREFIX  # families detects by it
VAE = "first_stage_model."

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
          ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
          ("conv_shortcut", "skip_connection")]  # fmt: skip
VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
            ("to_out.0", "proj_out")]  # fmt: skip


def _levels(config: dict) -> tuple[int, list[int], list[bool]]:
    n = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n
    cross = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    return n, lpb, cross


def unet_pairs(config: dict) -> list[tuple[str, str, list]]:
    """(diffusers prefix, original prefix, inner renames) for every U-Net module."""
    n, lpb, cross = _levels(config)
    pairs = [("time_embedding.linear_1", "time_embed.0", []),
             ("time_embedding.linear_2", "time_embed.2", []), ("conv_in", "input_blocks.0.0", []),
             ("conv_norm_out", "out.0", []), ("conv_out", "out.2", []),
             ("mid_block.resnets.0", "middle_block.0", RESNET),
             ("mid_block.attentions.0", "middle_block.1", []),
             ("mid_block.resnets.1", "middle_block.2", RESNET)]  # fmt: skip
    if config.get("addition_embed_type") == "text_time":  # SDXL: sgm's ``label_emb`` Sequential
        pairs += [("add_embedding.linear_1", "label_emb.0.0", []),
                  ("add_embedding.linear_2", "label_emb.0.2", [])]  # fmt: skip
    idx = 1  # input_blocks: one entry per resnet (+ its attention) and per downsampler
    for i in range(n):
        for j in range(lpb[i]):
            pairs.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", RESNET))
            if cross[i]:
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", []))
            idx += 1
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{idx}.0.op", []))
            idx += 1
    idx = 0  # output_blocks: [resnet, attention?, upsampler?] per entry, deepest level first
    for i in range(n):
        level = n - 1 - i
        for j in range(lpb[level] + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", RESNET))
            if cross[level]:
                pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", []))
            if j == lpb[level] and i < n - 1:
                up = f"output_blocks.{idx}.{2 if cross[level] else 1}.conv"
                pairs.append((f"up_blocks.{i}.upsamplers.0.conv", up, []))
            idx += 1
    return pairs


def vae_pairs(config: dict) -> list[tuple[str, str, list]]:
    """(diffusers prefix, original prefix, inner renames) for every autoencoder module."""
    n = len(config["block_out_channels"])
    ends = (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out"))
    pairs = [(f"{p}.{a}", f"{p}.{b}", []) for p in ("encoder", "decoder") for a, b in ends]
    pairs += [("quant_conv", "quant_conv", []), ("post_quant_conv", "post_quant_conv", [])]
    for p in ("encoder", "decoder"):
        pairs += [(f"{p}.mid_block.resnets.0", f"{p}.mid.block_1", VAE_RESNET),
                  (f"{p}.mid_block.resnets.1", f"{p}.mid.block_2", VAE_RESNET),
                  (f"{p}.mid_block.attentions.0", f"{p}.mid.attn_1", VAE_ATTN)]  # fmt: skip
    for i in range(n):
        pairs.append((f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block", VAE_RESNET))
        pairs.append(
            (f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample", [])
        )
        # the original decoder numbers its levels from the highest resolution, diffusers reverses
        up = f"decoder.up.{n - 1 - i}"
        pairs.append((f"decoder.up_blocks.{i}.resnets", f"{up}.block", VAE_RESNET))
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0", f"{up}.upsample", []))
    return pairs


def remap(state_dict: dict, pairs: list, to_original: bool, what: str) -> dict:
    """Rename keys through the prefix table (longest prefix wins); unknown keys are errors."""
    src, dst = (0, 1) if to_original else (1, 0)
    table = {p[src]: (p[dst], [(r[src], r[dst]) for r in p[2]]) for p in pairs}
    out = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:cut])
            if head in table:
                new_head, inner = table[head]
                rest = ".".join(parts[cut:])
                for old, new in inner:  # e.g. resnets: norm1 <-> in_layers.0
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old) :]
                        break
                out[f"{new_head}.{rest}"] = tensor
                break
        else:
            raise CheckpointError(f"{what}: weight {key!r} has no counterpart in the other layout")
    return out


def vae_attn_shapes(state_dict: dict, to_original: bool) -> dict:
    """The original mid-block attention uses 1x1 convs for q/k/v/proj_out; diffusers, linears."""
    pattern = re.compile(r"(en|de)coder\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
    out = {}
    for key, t in state_dict.items():
        if pattern.search(key):
            t = t[:, :, None, None] if to_original and t.ndim == 2 else t
            t = t.flatten(1) if not to_original and t.ndim == 4 else t
        out[key] = t
    return out
