"""Tiny SDXL base / refiner folders shaped like the real ones where single files care.

Unlike ``tiny.make_tiny_sdxl``: three (refiner: four) levels with levels that have no attention
and a transformer depth per level; CLIP-L and bigG of different widths (diffusers' single-file
loader tells them apart by width only); a non-square bigG projection (a transposed
``text_projection`` would not load). ``inferable=True``: widths whose head and norm-group counts
follow the real models' rules (64-channel heads, 32 groups), so a file with no metadata loads
without ``--config``. Also the original files' text-encoder prefixes and ``_bare`` (a CLIP state
dict without its ``text_model.`` level and position ids), shared by the single-file tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny import SCHEDULER_SDXL, TEXT, VAE

UNET_XL = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=8,
    block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=40 + 6 * 8,
)  # fmt: skip
UNET_REFINER = dict(
    UNET_XL, block_out_channels=(32, 32, 64, 64), attention_head_dim=(2, 2, 4, 4),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=2, cross_attention_dim=48,
    projection_class_embeddings_input_dim=40 + 5 * 8,
)  # fmt: skip
BIG_G = dict(TEXT, hidden_size=48, intermediate_size=96, num_attention_heads=4, projection_dim=40)
# inferable: 64-channel heads everywhere, 32 norm groups (the real models' rules)
UNET_INFERABLE = dict(
    UNET_XL, block_out_channels=(64, 64, 128), attention_head_dim=(1, 1, 2), norm_num_groups=32,
    cross_attention_dim=64 + 128, projection_class_embeddings_input_dim=96 + 6 * 8,
)  # fmt: skip
VAE_INFERABLE = dict(VAE, block_out_channels=(32, 64), norm_num_groups=32)
CLIP_L_INFERABLE = dict(TEXT, hidden_size=64, intermediate_size=128, num_attention_heads=1)
BIG_G_INFERABLE = dict(BIG_G, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                       projection_dim=96)  # fmt: skip


def make_xl(path: Path, refiner: bool = False, seed: int = 0, inferable: bool = False) -> Path:
    """A tiny random SDXL base / refiner diffusers folder (diffusers' own classes)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm.text.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNET_INFERABLE if inferable else UNET_REFINER if refiner else UNET_XL
    clip_l, big_g = (CLIP_L_INFERABLE, BIG_G_INFERABLE) if inferable else (TEXT, BIG_G)
    parts = dict(
        unet=UNet2DConditionModel(**unet),
        vae=AutoencoderKL(**(VAE_INFERABLE if inferable else VAE), scaling_factor=0.13025),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**big_g, hidden_act="gelu")),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_SDXL),
    )
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            **parts, text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )  # fmt: skip
    else:
        text = CLIPTextModel(CLIPTextConfig(**clip_l, hidden_act="quick_gelu"))
        pipe = StableDiffusionXLPipeline(
            **parts, text_encoder=text, tokenizer=build_clip_tokenizer()
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# an original SDXL file's text encoders: the base's CLIP-L and bigG, the refiner's bigG
BASE_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
REFINER_PREFIX = "conditioner.embedders.0.model."


def _bare(sd: dict) -> dict:
    return {k.removeprefix("text_model."): v for k, v in sd.items() if "position_ids" not in k}
