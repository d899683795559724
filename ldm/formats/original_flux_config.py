"""FLUX.1 transformer configs of original single files: what the keys say (widths, depths,
head width, guidance embedding, in/out channels) over FLUX.1-dev's / schnell's shipped diffusers
configs (the family registry), and the variant's name for the user. ldm.formats.original_flux
loads and saves the weights.
"""

from __future__ import annotations

import copy
import re

from ldm.errors import CheckpointError
from ldm.models import families

MLP_RATIO = 4.0  # diffusers FluxSingleTransformerBlock / BFL SingleStreamBlock mlp_ratio


def single_file_configs(guidance: bool) -> dict:
    """FLUX.1-dev's (``guidance``) or FLUX.1-schnell's diffusers configs, from the family
    registry (what a single file cannot say)."""
    family = families.get("flux").for_network({"guidance_embeds": guidance})
    return copy.deepcopy(family.single_file)


def widths(config: dict) -> tuple[int, int]:
    """(attention width, single-block MLP width) of a diffusers FLUX transformer config."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return width, int(width * MLP_RATIO)


def _blocks(keys, name: str, source: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"{name}\.(\d+)\.", k))}
    if found != set(range(len(found))):
        raise CheckpointError(f"{source}: FLUX {name} {sorted(found)[:4]}... are not 0..N-1")
    return len(found)


def infer_transformer_config(net: dict, source: str = "transformer") -> tuple[dict, dict]:
    """A diffusers FluxTransformer2DModel config from original-key shapes, and what was assumed.

    Widths, depths, head width (the q/k norm's length), guidance embedding and in/out channels
    (FLUX.1 64; Fill 384, Depth/Canny 128 in) are read; the RoPE axes are FLUX.1's.
    """
    n, n_single = _blocks(net, "double_blocks", source), _blocks(net, "single_blocks", source)
    width, in_channels = net["img_in.weight"].shape
    norm = (
        "double_blocks.0.img_attn.norm.query_norm.scale"
        if n
        else "single_blocks.0.norm.query_norm.scale"
    )
    head = net[norm].shape[0]
    guidance = "guidance_in.in_layer.weight" in net
    config = dict(out_channels=None, **single_file_configs(guidance)["transformer"])
    out_channels = net["final_layer.linear.weight"].shape[0]
    config.update(
        in_channels=in_channels, out_channels=None if out_channels == in_channels else out_channels,
        num_layers=n, num_single_layers=n_single, attention_head_dim=head,
        num_attention_heads=width // head, joint_attention_dim=net["txt_in.weight"].shape[1],
        pooled_projection_dim=net["vector_in.in_layer.weight"].shape[1], guidance_embeds=guidance,
    )  # fmt: skip
    if width % head or sum(config["axes_dims_rope"]) != head:
        raise CheckpointError(f"{source}: FLUX transformer of width {width} with {head}-wide "
                              "heads: no released FLUX.1 (pass --config FOLDER)")  # fmt: skip
    if (
        n_single
        and net["single_blocks.0.linear1.weight"].shape[0] != sum(widths(config)) + 2 * width
    ):
        raise CheckpointError(f"{source}: FLUX single blocks whose MLP is not {MLP_RATIO:g}x wide")
    notes = {"transformer.axes_dims_rope": f"{config['axes_dims_rope']} (FLUX.1)"}
    return config, notes


def variant(config: dict) -> str:
    """What a transformer config is, in the names people use."""
    names = {64: "FLUX.1-dev" if config.get("guidance_embeds") else "FLUX.1-schnell",
             384: "FLUX.1-Fill", 128: "FLUX.1-Depth/Canny"}  # fmt: skip
    name = names.get(config["in_channels"], "FLUX.1")
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return (f"{name}-shaped, {config['num_layers']} double + {config['num_single_layers']} "
            f"single blocks x {width}")  # fmt: skip
