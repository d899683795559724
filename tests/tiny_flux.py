"""A tiny FLUX.1-shaped diffusers folder with random weights, built offline with diffusers itself.

``make_tiny_flux(path, guidance_embeds=True)`` writes a ``FluxPipeline`` folder: a
``FluxTransformer2DModel`` with one double- and one single-stream block (64 packed input channels
= 16 latent channels x 2 x 2, RoPE axes summing to the head width), a 16-channel VAE without quant
convs (FLUX's scaling 0.3611 and shift 0.1159), CLIP-L as a plain ``CLIPTextModel`` (FLUX reads
its pooled output, unprojected) with ldm's offline CLIP BPE, a T5 encoder with ldm's offline
T5-style tokenizer, and FLUX.1-dev's scheduler config (dynamic shift). ``guidance_embeds=False``
makes a schnell-style folder (no guidance embedding, static shift 1, as FLUX.1-schnell's).

Fixtures (import them into a test module: ``from tiny_flux import tiny_flux_dev, ...``):
``tiny_flux_dev`` and ``tiny_flux_schnell``, session-scoped folder paths.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import TEXT
from tiny_sd3 import T5, _clip_tokenizer

CLIP_L = dict(TEXT, hidden_act="quick_gelu")  # real: 768 wide; FLUX takes its pooler_output
TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=T5["d_model"],
    pooled_projection_dim=TEXT["hidden_size"],
    axes_dims_rope=(4, 6, 6),
)  # fmt: skip  (real: 19 double + 38 single blocks, 24 heads of 128, axes (16, 56, 56))
VAE_FLUX = dict(
    in_channels=3, out_channels=3, block_out_channels=(16, 32), norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=16, sample_size=32,
    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
)  # fmt: skip
# black-forest-labs/FLUX.1-dev's scheduler_config.json; schnell's: static shift 1, no dynamic
SCHEDULER_DEV = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)  # fmt: skip
SCHEDULER_SCHNELL = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def make_tiny_flux(
    path: str | Path, guidance_embeds: bool = True, seed: int = 0, transformer: dict | None = None
) -> Path:
    """Write a tiny random FluxPipeline folder at ``path`` and return it."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ldm.text.tokenizer import build_t5_tokenizer

    torch.manual_seed(seed)
    tokenizer_2 = build_t5_tokenizer()
    config = dict(TRANSFORMER, guidance_embeds=guidance_embeds, **(transformer or {}))
    scheduler = SCHEDULER_DEV if guidance_embeds else SCHEDULER_SCHNELL
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(**config),
        vae=AutoencoderKL(**VAE_FLUX),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **T5)),
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_flux_dev(tmp_path_factory) -> Path:
    """A tiny random FLUX.1-dev-shaped folder: guidance embedding, dynamic shift."""
    return make_tiny_flux(tmp_path_factory.mktemp("tiny_flux_dev"))


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory) -> Path:
    """A tiny random FLUX.1-schnell-shaped folder: no guidance embedding, static shift 1."""
    return make_tiny_flux(tmp_path_factory.mktemp("tiny_flux_schnell"), False, seed=1)
