"""Building a model's parts: from diffusers config dicts (to load weights into) or from a model
config YAML (configs/models/*.yaml, to train from nothing).

Parts that are about to receive weights are built without running their initialisers (ldm's
own modules on the meta device, transformers' with its ``no_init_weights``): initialising an
SD 1.5 U-Net only to overwrite it costs seconds and a second copy of the weights. The YAML
sections are diffusers' own config dicts, so a model built here saves as a diffusers folder
unchanged; the U-Net and VAE sections are checked field by field (unknown fields are errors).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from ldm.config import load_config
from ldm.errors import ConfigError
from ldm.models import families
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.flux import FluxConfig, FluxTransformer2DModel
from ldm.models.mmdit import SD3Config, SD3Transformer2DModel
from ldm.models.parts import ModelParts
from ldm.models.unet import UNet2DConditionModel, UNetConfig
from ldm.text.tokenizer import build_clip_tokenizer

try:  # transformers >= 5
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights

# a family's network (ldm.models.families.Family.network) -> (config class, module class)
NETWORKS = {
    "UNet2DConditionModel": (UNetConfig, UNet2DConditionModel),
    "SD3Transformer2DModel": (SD3Config, SD3Transformer2DModel),
    "FluxTransformer2DModel": (FluxConfig, FluxTransformer2DModel),
}
# a text encoder's transformers architecture -> (config class, model class)
TEXT_MODELS = {
    "CLIPTextModel": (CLIPTextConfig, CLIPTextModel),
    "CLIPTextModelWithProjection": (CLIPTextConfig, CLIPTextModelWithProjection),  # SDXL's 2nd
    "T5EncoderModel": (T5Config, T5EncoderModel),
}
_BAD_CONFIG = (ValueError, TypeError, ZeroDivisionError)  # an inconsistent architecture


def _build(make, where: str, empty: bool):
    try:
        with torch.device("meta") if empty else contextlib.nullcontext():
            return make()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except _BAD_CONFIG as e:
        raise ConfigError(f"{where}: invalid config ({str(e).splitlines()[0]})") from None


def build_network(
    config: dict, where: Path | str = "unet", *, family: str = "sd1", empty: bool = False
) -> torch.nn.Module:
    """The family's latent network from its diffusers config; ``empty``: on the meta device."""
    config_cls, module_cls = NETWORKS[families.get(family).network]
    return _build(lambda: module_cls(config_cls.from_diffusers(config)), str(where), empty)


def build_vae(config: dict, where: Path | str = "vae", *, empty: bool = False) -> torch.nn.Module:
    """ldm's AutoencoderKL from a diffusers config; ``empty``: on the meta device."""
    return _build(
        lambda: AutoencoderKL(AutoencoderConfig.from_diffusers(config)), str(where), empty
    )


def build_text_encoder(
    config: dict, architecture: str = "CLIPTextModel", *, empty: bool = False
) -> torch.nn.Module:
    """A transformers text model (``TEXT_MODELS``) from a config dict; ``empty``: uninitialised."""
    config_cls, model_cls = TEXT_MODELS[architecture]
    try:
        with no_init_weights() if empty else contextlib.nullcontext():
            return model_cls(config_cls(**config))
    except _BAD_CONFIG as e:
        raise ConfigError(f"text encoder: invalid config ({str(e).splitlines()[0]})") from None


# ---------------------------------------------------------------- from a model config YAML


@dataclass
class ModelConfig:
    name: str = "model"
    unet: dict[str, Any] = field(default_factory=dict)  # UNet2DConditionModel config
    vae: dict[str, Any] = field(default_factory=dict)  # AutoencoderKL config
    text_encoder: dict[str, Any] = field(default_factory=dict)  # transformers CLIPTextConfig
    scheduler: dict[str, Any] = field(default_factory=dict)  # scheduler_config.json
    # an SD3-family model instead of a U-Net one: SD3Transformer2DModel config and the second
    # CLIP (both CLIPs then with projection, as SD3's); no T5 (its block is zeros)
    transformer: dict[str, Any] = field(default_factory=dict)
    text_encoder_2: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)  # stored with it (ldm_model.json)


def load_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    return load_config(ModelConfig, path, overrides)


def build_model(cfg: ModelConfig, seed: int = 0) -> ModelParts:
    """Random-init U-Net, VAE and CLIP text encoder (offline tokenizer) as ModelParts; with a
    ``transformer`` section, an SD3-family model (``build_sd3_model``)."""
    torch.manual_seed(seed)  # initialisation only; training draws from its own generators
    if cfg.transformer:
        return build_sd3_model(cfg)
    unet = build_network(cfg.unet)
    vae = build_vae(cfg.vae)
    text_encoder = build_text_encoder(cfg.text_encoder)
    hidden = text_encoder.config.hidden_size
    if cfg.unet.get("cross_attention_dim") != hidden:
        raise ConfigError(
            f"unet.cross_attention_dim ({cfg.unet.get('cross_attention_dim')}) must equal "
            f"text_encoder.hidden_size ({hidden})"
        )
    tokenizer = build_clip_tokenizer(model_max_length=text_encoder.config.max_position_embeddings)
    return ModelParts(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=dict(cfg.scheduler),
        name=cfg.name,
        family=families.from_text_encoder(text_encoder),
    )


def build_sd3_model(cfg: ModelConfig) -> ModelParts:
    """An SD3-family model from nothing: MMDiT, VAE, and two CLIPs with projection whose
    penultimate states, side by side, are the context and whose projections, side by side, the
    pooled vector (Esser et al. 2024, sec. 5.1); without T5 its block is zeros, as diffusers'."""
    if cfg.unet:
        raise ConfigError("model config: set either unet or transformer, not both")
    transformer = build_network(cfg.transformer, "transformer", family="sd3")
    # diffusers' SD3 pipelines add the VAE's shift_factor unconditionally: 0, not null
    vae = build_vae({"shift_factor": 0.0, **cfg.vae})
    clip_l = build_text_encoder(cfg.text_encoder, "CLIPTextModelWithProjection")
    clip_g = build_text_encoder(cfg.text_encoder_2, "CLIPTextModelWithProjection")
    c = transformer.config
    width = clip_l.config.hidden_size + clip_g.config.hidden_size
    pooled = clip_l.config.projection_dim + clip_g.config.projection_dim
    if width > c.joint_attention_dim or pooled != c.pooled_projection_dim:
        raise ConfigError(
            f"transformer: joint_attention_dim ({c.joint_attention_dim}) must be >= the CLIPs' "
            f"hidden sizes together ({width}) and pooled_projection_dim "
            f"({c.pooled_projection_dim}) equal their projection_dims together ({pooled})"
        )
    tokenizer = build_clip_tokenizer(model_max_length=clip_l.config.max_position_embeddings)
    tokenizer_2 = build_clip_tokenizer(
        model_max_length=clip_g.config.max_position_embeddings, pad_token="!"
    )  # CLIP-G's tokenizer pads with "!" (id 0), as OpenCLIP's
    return ModelParts(
        unet=transformer,
        vae=vae,
        text_encoder=clip_l,
        tokenizer=tokenizer,
        text_encoder_2=clip_g,
        tokenizer_2=tokenizer_2,
        scheduler_config=dict(cfg.scheduler),
        name=cfg.name,
        family=families.get("sd3"),
        defaults=dict(cfg.defaults),
    )
