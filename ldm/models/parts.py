"""ModelParts: a loaded latent diffusion model, the record every loader returns and every user
of a model (pipeline, trainer, LoRA, exporters) takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.models.families import FAMILIES, Family, TextEncoderSpec


@dataclass
class ModelParts:
    """ldm's network and VAE, transformers text encoders, and what is known about them."""

    unet: torch.nn.Module  # the latent network (ldm.models.unet.UNet2DConditionModel)
    vae: torch.nn.Module  # ldm.models.autoencoder.AutoencoderKL
    text_encoder: torch.nn.Module | None  # transformers.CLIPTextModel (None: SDXL refiner)
    tokenizer: Any  # transformers.CLIPTokenizer (None with no text_encoder)
    scheduler_config: dict  # diffusers scheduler_config.json (betas, prediction_type, ...)
    model_index: dict = field(default_factory=dict)  # model_index.json as read (or {})
    path: Path | None = None  # where it was loaded from
    name: str = ""  # a short display name (folder or file stem)
    inferred: dict[str, str] = field(default_factory=dict)  # guessed, not read (single files)
    family: Family = FAMILIES["sd1"]  # ldm.models.families entry
    text_encoder_2: torch.nn.Module | None = None  # SDXL: transformers CLIPTextModelWithProjection
    tokenizer_2: Any = None  # SDXL: its CLIPTokenizer (pads with id 0, as OpenCLIP)
    text_encoder_3: torch.nn.Module | None = None  # SD3: transformers T5EncoderModel (optional)
    tokenizer_3: Any = None  # SD3: its T5 tokenizer (from the model folder)
    # sampling defaults stored with the model (sampler, schedule, steps, guidance_scale): they
    # override the family's (an LCM student's "lcm, 4 steps, guidance 1")
    defaults: dict = field(default_factory=dict)
    # LoRAs merged into the weights at load (a LoRA model's own), as the image records list them
    loras: list[dict] = field(default_factory=list)

    def text_modules(self) -> list[tuple[TextEncoderSpec, torch.nn.Module, Any]]:
        """(spec, text model, tokenizer) for each of the family's text encoders, in order; an
        optional one the model does without (SD3 without T5) is left out."""
        return [
            (spec, getattr(self, spec.subfolder), getattr(self, spec.tokenizer))
            for spec in self.family.text_encoders
            if not (spec.optional and getattr(self, spec.subfolder) is None)
        ]

    @property
    def prediction_type(self) -> str:
        # diffusers' schedulers default to epsilon when the config names none
        return self.scheduler_config.get("prediction_type", "epsilon")
