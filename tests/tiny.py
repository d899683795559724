"""Tiny random-weight diffusers folders for tests (built with diffusers itself, no download).

``make_tiny_folder(path, kind)`` writes a complete ``StableDiffusionPipeline`` folder:
kind "sd1" is SD 1.x-shaped (conv proj_in, fixed head count, eps, PNDM/steps_offset=1 scheduler
config, CLIP quick_gelu); kind "sd2" is SD 2.x-shaped (linear proj, per-block head dims,
upcast_attention, v-prediction, gelu text encoder). The tokenizer is ldm's offline CLIP BPE.
"""

from __future__ import annotations

from pathlib import Path

import torch

UNET_SD1 = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
UNET_SD2 = dict(
    UNET_SD1,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    upcast_attention=True,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=3,
    max_position_embeddings=77,
    vocab_size=49408,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
SCHEDULER_SD1 = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    skip_prk_steps=True,
    set_alpha_to_one=False,
    clip_sample=False,
    prediction_type="epsilon",
)
SCHEDULER_SD2 = dict(SCHEDULER_SD1, prediction_type="v_prediction")


def make_tiny_folder(path: str | Path, kind: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny random StableDiffusionPipeline folder at ``path`` and return it."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.text.tokenizer import build_clip_tokenizer

    path = Path(path)
    torch.manual_seed(seed)
    sd2 = kind == "sd2"
    unet = UNet2DConditionModel(**(UNET_SD2 if sd2 else UNET_SD1))
    vae = AutoencoderKL(**VAE)
    text = CLIPTextModel(CLIPTextConfig(**TEXT, hidden_act="gelu" if sd2 else "quick_gelu"))
    # from_config ignores (and records) keys a class does not take, as a real folder has them
    scheduler_cls = DDIMScheduler if sd2 else PNDMScheduler
    scheduler = scheduler_cls.from_config(SCHEDULER_SD2 if sd2 else SCHEDULER_SD1)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=build_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
