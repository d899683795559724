"""ModelParts: a loaded latent diffusion model, the record every loader returns and every user
of a model (pipeline, trainer, LoRA, exporters) takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.models.families import FAMILIES, Family


@dataclass
class ModelParts:
    """ldm's network and VAE, a transformers text encoder, and what is known about them."""

    unet: torch.nn.Module  # the latent network (ldm.models.unet.UNet2DConditionModel)
    vae: torch.nn.Module  # ldm.models.autoencoder.AutoencoderKL
    text_encoder: torch.nn.Module  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler_config: dict  # diffusers scheduler_config.json (betas, prediction_type, ...)
    model_index: dict = field(default_factory=dict)  # model_index.json as read (or {})
    path: Path | None = None  # where it was loaded from
    name: str = ""  # a short display name (folder or file stem)
    inferred: dict[str, str] = field(default_factory=dict)  # guessed, not read (single files)
    family: Family = FAMILIES["sd1"]  # ldm.models.families entry

    @property
    def prediction_type(self) -> str:
        # diffusers' schedulers default to epsilon when the config names none
        return self.scheduler_config.get("prediction_type", "epsilon")
