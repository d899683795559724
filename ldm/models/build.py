"""Build a complete model from nothing, from a model config YAML (configs/models/*.yaml).

The sections are diffusers' own config dicts (unet/config.json, vae/config.json,
text_encoder/config.json, scheduler/scheduler_config.json), so a model built here saves as a
diffusers folder unchanged. The U-Net and VAE sections are checked field by field by
``UNetConfig.from_diffusers`` / ``AutoencoderConfig.from_diffusers`` (unknown fields are errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.config import load_config
from ldm.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "model"
    unet: dict[str, Any] = field(default_factory=dict)  # UNet2DConditionModel config
    vae: dict[str, Any] = field(default_factory=dict)  # AutoencoderKL config
    text_encoder: dict[str, Any] = field(default_factory=dict)  # transformers CLIPTextConfig
    scheduler: dict[str, Any] = field(default_factory=dict)  # scheduler_config.json


def load_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    return load_config(ModelConfig, path, overrides)


def build_model(cfg: ModelConfig, seed: int = 0):
    """Random-init U-Net, VAE and CLIP text encoder (offline tokenizer) as ModelParts."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.formats.diffusers_folder import ModelParts
    from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm.models.unet import UNet2DConditionModel, UNetConfig
    from ldm.text.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)  # initialisation only; training draws from its own generators
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(cfg.unet))
    vae = AutoencoderKL(AutoencoderConfig.from_diffusers(cfg.vae))
    try:
        text_config = CLIPTextConfig(**cfg.text_encoder)
    except TypeError as e:
        raise ConfigError(f"text_encoder: {e}") from None
    text_encoder = CLIPTextModel(text_config)
    tokenizer = build_clip_tokenizer(model_max_length=text_config.max_position_embeddings)
    if cfg.unet.get("cross_attention_dim") != text_config.hidden_size:
        raise ConfigError(
            f"unet.cross_attention_dim ({cfg.unet.get('cross_attention_dim')}) must equal "
            f"text_encoder.hidden_size ({text_config.hidden_size})"
        )
    return ModelParts(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=dict(cfg.scheduler),
        model_index={},
        path=None,
        name=cfg.name,
    )
