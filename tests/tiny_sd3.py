"""A tiny SD3-shaped diffusers folder with random weights, built offline with diffusers itself.

``make_tiny_sd3(path, t5=True)`` writes a ``StableDiffusion3Pipeline`` folder: an SD3-medium-shaped
``SD3Transformer2DModel`` (``transformer=`` overrides its config, e.g. for 3.5-medium's dual
attention layers and RMS q/k norm), a 16-channel VAE without quant convs (scaling 1.5305, shift
0.0609), CLIP-L and CLIP-G as ``CLIPTextModelWithProjection`` of different widths (ldm's offline
CLIP BPE; CLIP-G's tokenizer pads with "!" as OpenCLIP), a T5 encoder with ldm's offline T5-style
tokenizer, and ``FlowMatchEulerDiscreteScheduler(shift=3.0)``. With ``t5=False`` the folder has
no T5 (``text_encoder_3`` / ``tokenizer_3`` null in model_index.json, as a T5-less SD3 folder).

Fixtures (import them into a test module: ``from tiny_sd3 import tiny_sd3, tiny_sd3_no_t5``):
``tiny_sd3`` and ``tiny_sd3_no_t5``, session-scoped folder paths.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch
from tiny import TEXT

CLIP_L = dict(TEXT, projection_dim=24, hidden_act="quick_gelu")  # real: 768 wide, projected 768
CLIP_G = dict(
    TEXT,
    hidden_size=48,
    intermediate_size=96,
    num_attention_heads=4,
    projection_dim=40,
    hidden_act="gelu",
)  # fmt: skip  (real: 1280, projected 1280)
T5 = dict(d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
          relative_attention_num_buckets=8, relative_attention_max_distance=32)  # fmt: skip
# SD3-medium-shaped: joint_attention_dim = T5's width, pooled = CLIP-L + CLIP-G projections
TRANSFORMER = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
    attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5["d_model"],
    caption_projection_dim=32, pooled_projection_dim=24 + 40, pos_embed_max_size=16,
)  # fmt: skip
VAE_SD3 = dict(
    in_channels=3, out_channels=3, block_out_channels=(16, 32), norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=16, sample_size=32,
    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
)  # fmt: skip


@lru_cache  # building one reads open_clip's 49k merges (seconds); both folders share them
def _clip_tokenizer(pad_token: str = "<|endoftext|>"):
    from ldm.text.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(pad_token=pad_token)


def make_tiny_sd3(
    path: str | Path, t5: bool = True, seed: int = 0, transformer: dict | None = None
) -> Path:
    """Write a tiny random StableDiffusion3Pipeline folder at ``path`` and return it."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ldm.text.tokenizer import build_t5_tokenizer

    torch.manual_seed(seed)
    tokenizer_3 = build_t5_tokenizer() if t5 else None
    text_encoder_3 = None
    if t5:
        config = T5Config(vocab_size=len(tokenizer_3), **T5)
        text_encoder_3 = T5EncoderModel(config)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**{**TRANSFORMER, **(transformer or {})}),
        vae=AutoencoderKL(**VAE_SD3),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
        tokenizer_2=_clip_tokenizer(pad_token="!"),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny random SD3-shaped diffusers folder with CLIP-L, CLIP-G and T5."""
    return make_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="session")
def tiny_sd3_no_t5(tmp_path_factory) -> Path:
    """The same shapes without T5 (text_encoder_3 / tokenizer_3 null in model_index.json)."""
    return make_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3_no_t5"), t5=False, seed=1)
