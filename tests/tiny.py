"""Tiny random-weight diffusers folders for tests (built with diffusers itself, no download).

``make_tiny_folder(path, kind)`` writes a complete ``StableDiffusionPipeline`` folder:
kind "sd1" is SD 1.x-shaped (conv proj_in, fixed head count, eps, PNDM/steps_offset=1 scheduler
config, CLIP quick_gelu); kind "sd2" is SD 2.x-shaped (linear proj, per-block head dims,
upcast_attention, v-prediction, gelu text encoder). The tokenizer is ldm's offline CLIP BPE.
``make_tiny_sdxl(path, refiner=False)`` writes a ``StableDiffusionXLPipeline`` folder shaped like
diffusers' own SDXL test components (text_time U-Net, CLIP + CLIP-with-projection, Euler
"leading"), or the refiner's ``StableDiffusionXLImg2ImgPipeline`` (second encoder only, 5 ids).
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


def make_tiny_folder(
    path: str | Path, kind: str = "sd1", seed: int = 0, unet: dict | None = None
) -> Path:
    """Write a tiny random StableDiffusionPipeline folder at ``path`` and return it
    (``unet=`` overrides keys of the U-Net's config)."""
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
    unet = UNet2DConditionModel(**{**(UNET_SD2 if sd2 else UNET_SD1), **(unet or {})})
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


UNET_SDXL = dict(
    UNET_SD2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    upcast_attention=False,
    transformer_layers_per_block=(1, 2),
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    cross_attention_dim=64,  # 32 (CLIP) + 32 (CLIP with projection)
    projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled + 6 ids x 8
)
UNET_SDXL_REFINER = dict(
    UNET_SDXL, cross_attention_dim=32, projection_class_embeddings_input_dim=32 + 5 * 8
)
SCHEDULER_SDXL = dict(
    SCHEDULER_SD1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
    sample_max_value=1.0,
)


def make_tiny_sdxl(path: str | Path, refiner: bool = False, seed: int = 0) -> Path:
    """Write a tiny random SDXL base (or refiner) diffusers folder at ``path`` and return it."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm.text.tokenizer import build_clip_tokenizer

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(UNET_SDXL_REFINER if refiner else UNET_SDXL))
    vae = AutoencoderKL(**VAE, scaling_factor=0.13025)
    text = CLIPTextModel(CLIPTextConfig(**TEXT, hidden_act="quick_gelu"))
    text_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**TEXT, hidden_act="gelu", projection_dim=32)
    )
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_SDXL)
    tokenizer_2 = build_clip_tokenizer(pad_token="!")  # OpenCLIP pads with id 0, as SDXL's does
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=text_2, tokenizer=None,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        )  # fmt: skip
    else:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=build_clip_tokenizer(),
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
        )  # fmt: skip
    pipe.save_pretrained(path, safe_serialization=True)
    return path
