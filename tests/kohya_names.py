"""kohya's SDXL LoRA module names, written for tests from sgm's U-Net construction.

kohya trains SDXL on its copy of sgm's openaimodel U-Net (sd-scripts library/sdxl_original_unet.py)
and names a LoRA module ``lora_unet_`` + its path with dots as underscores (networks/lora.py).
These rules are written out here, independently of ldm's key tables, so tests can build kohya
files that ldm's tables did not produce.
"""

from __future__ import annotations

TRANSFORMER = [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
TRANSFORMER += ["ff.net.0.proj", "ff.net.2"]
RESNET = ["in_layers.2", "emb_layers.1", "out_layers.3"]
# kohya's text-encoder targets: the Linears of CLIPAttention and CLIPMLP
CLIP = [f"self_attn.{p}_proj" for p in ("q", "k", "v", "out")] + ["mlp.fc1", "mlp.fc2"]


def sgm_unet_modules(config: dict) -> list[str]:
    """The Linear/Conv2d paths of sgm's openaimodel UNet for a diffusers SDXL config.

    Written from sgm's construction (and kohya's copy of it): input_blocks[0] is conv_in; each
    level adds layers_per_block [ResBlock, SpatialTransformer?] entries, then a Downsample (op);
    middle_block is [ResBlock, SpatialTransformer, ResBlock]; output_blocks has one more entry
    per level, deepest first, the last of a level ending in an Upsample (conv).
    """
    channels, lpb = config["block_out_channels"], config["layers_per_block"]
    attention = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    depth = config["transformer_layers_per_block"]

    def transformer(prefix, d):
        inner = [f"transformer_blocks.{b}.{m}" for b in range(d) for m in TRANSFORMER]
        return [f"{prefix}.{m}" for m in ("proj_in", "proj_out", *inner)]

    names = ["time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2", "input_blocks.0.0",
             "out.2"]  # fmt: skip
    idx, ch = 1, channels[0]
    for level, out_ch in enumerate(channels):
        for _ in range(lpb):
            names += [f"input_blocks.{idx}.0.{r}" for r in RESNET]
            names += [f"input_blocks.{idx}.0.skip_connection"] if ch != out_ch else []
            names += transformer(f"input_blocks.{idx}.1", depth[level]) if attention[level] else []
            idx, ch = idx + 1, out_ch
        if level < len(channels) - 1:
            names.append(f"input_blocks.{idx}.0.op")
            idx += 1
    names += [f"middle_block.{i}.{r}" for i in (0, 2) for r in RESNET]
    names += transformer("middle_block.1", depth[-1])
    idx = 0
    for level in reversed(range(len(channels))):
        for j in range(lpb + 1):  # every output resnet takes a concatenated skip: a 1x1 shortcut
            names += [f"output_blocks.{idx}.0.{r}" for r in [*RESNET, "skip_connection"]]
            names += transformer(f"output_blocks.{idx}.1", depth[level]) if attention[level] else []
            if j == lpb and level > 0:
                names.append(f"output_blocks.{idx}.{2 if attention[level] else 1}.conv")
            idx += 1
    return names
