"""The trainer's view of the model: where it starts, which parts it has and which train in a
stage, where data comes from, and how the result is exported."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ldm.dtypes import DTYPES
from ldm.errors import ConfigError
from ldm.formats.diffusers_folder import save_folder
from ldm.loading import load_model
from ldm.models.build import build_model, load_model_config
from ldm.models.bundled import write_manifest
from ldm.sampling.flow import flow_config
from ldm.sampling.plan import is_flow
from ldm.train.batches import ShapesBatches, TrainBatch
from ldm.train.config import StageConfig, TrainConfig
from ldm.train.folder_batches import FolderBatches
from ldm.train.lora import add_lora
from ldm.train.teacher_data import TeacherSamples

TRAINABLE = ("vae", "unet", "text_encoder", "text_encoder_2")


def model_parts(parts) -> list[str]:
    """The trainable parts this model has (an SDXL refiner has no text_encoder, SD no _2)."""
    return [n for n in TRAINABLE if getattr(parts, n, None) is not None]


def load_start_model(cfg: TrainConfig):
    """ModelParts from a checkpoint (``model.pretrained``) or built from ``model.config``."""
    src = cfg.model
    if (src.pretrained is None) == (src.config is None):
        raise ConfigError("set exactly one of model.pretrained and model.config")
    if src.config is not None:
        parts = build_model(load_model_config(src.config), seed=cfg.seed)
    else:
        parts = load_model(src.pretrained, device="cpu", dtype=torch.float32)
    replace_scheduler_keys(parts, src.scheduler)
    return parts


def replace_scheduler_keys(parts, overrides: dict) -> None:
    """``model.scheduler``: keys of the start model's scheduler config replaced (the export keeps
    them); a key it neither has nor, for a flow model, ldm reads is refused by name."""
    known = set(parts.scheduler_config)  # and for a flow model the keys ldm reads, defaulted
    if is_flow(parts.scheduler_config):
        known |= set(flow_config(parts.scheduler_config))
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"model.scheduler: {', '.join(unknown)} is not a key of the model's "
                          f"scheduler config ({', '.join(sorted(known))})")  # fmt: skip
    shift = overrides.get("shift", 1.0)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 < shift < math.inf:
        raise ConfigError(f"model.scheduler.shift: a positive number, got {shift!r}")
    parts.scheduler_config = {**parts.scheduler_config, **overrides}


def stage_parts(parts, stage: StageConfig) -> list[str]:
    """The stage's ``train`` list in ModelParts names: a transformer family's network (SD3,
    FLUX: diffusers' "transformer" folder) is trained as "transformer" and held as ``unet``."""
    network = parts.family.network_folder
    return ["unet" if n == network else n for n in stage.train]


def set_trainable(parts, stage: StageConfig, gradient_checkpointing: bool) -> dict:
    """Freeze everything, then unfreeze (or add LoRA to) the parts this stage trains."""
    present = model_parts(parts)
    unknown = [n for n in stage_parts(parts, stage) if n not in present]
    if unknown:
        raise ConfigError(
            f"stages.{stage.name}.train: unknown part '{unknown[0]}' (this model has {present})"
        )
    train = stage_parts(parts, stage)
    if stage.method == "lora" and stage.lora.text_encoder:  # every text encoder (kohya te1, te2)
        train += [n for n in present if n.startswith("text_encoder") and n not in train]
    if stage.method == "lora" and "vae" in train:
        raise ConfigError(f"stages.{stage.name}: LoRA applies to the unet and text encoders only")
    trained = {}
    for name in present:
        module = getattr(parts, name)
        module.requires_grad_(False)
        module.eval()
        if name not in train:
            continue
        if stage.method == "lora":
            add_lora(module, name, stage.lora)
        else:
            module.requires_grad_(True)
        module.train()
        if gradient_checkpointing:
            enable_gradient_checkpointing(module, name)
        trained[name] = module
    return trained


def enable_gradient_checkpointing(module: torch.nn.Module, name: str) -> None:
    """Recompute activations in the backward pass (Chen et al. 2016): the U-Net's blocks, the
    text encoders' layers (transformers; non-reentrant, so LoRA on frozen layers gets grads)."""
    if name == "unet":
        module.enable_gradient_checkpointing()
    elif name.startswith("text_encoder"):
        kwargs = {"use_reentrant": False}
        if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class StageData:
    """The stage's batches: images (and captions) by step, or cached latents by step."""

    def __init__(self, cfg: TrainConfig, stage: StageConfig, rank: int, world: int):
        self.config = stage.data or cfg.data
        self.latents = None
        if self.config.source == "shapes":
            self.source = ShapesBatches(self.config, stage.batch_size, rank, world)
        elif self.config.source == "teacher":  # a distill stage's own teacher samples
            if stage.distill is None:
                raise ConfigError(f"stages.{stage.name}: data.source teacher needs a distill stage")
            self.source = TeacherSamples(self.config, stage.batch_size, rank, world)
        else:
            self.source = FolderBatches(
                self.config, stage.batch_size, cfg.seed, rank, world, Path(cfg.output_dir)
            )

    def images(self, step: int):
        return self.source.images(step)

    def cached(self, step: int):
        return self.source.cached(step)

    def batch(self, step: int) -> TrainBatch:
        return self.source.batch(step)

    def all_captions(self) -> list[str]:
        return self.source.all_captions()


def stage_batches(
    cfg: TrainConfig, stage: StageConfig, parts, rank: int, world: int, log, distiller=None
):
    """The stage's data; with data.cache_latents (and a frozen VAE) its latents encoded once;
    for a distill stage on ``source: teacher``, the samples of its distiller's teacher."""
    data = StageData(cfg, stage, rank, world)
    if isinstance(data.source, TeacherSamples):
        device = next(parts.unet.parameters()).device
        data.source.generate(parts, distiller, device, cfg.seed, Path(cfg.output_dir) / "cache",
                             log)  # fmt: skip
    elif data.config.cache_latents and "vae" not in stage.train:
        if isinstance(data.source, ShapesBatches):
            log.info(f"caching VAE latents of {data.config.cache_size} images")
            data.source.cache_latents(parts.vae)
            data.latents = data.source.latents
        else:
            written = data.source.cache_latents(parts.vae, Path(cfg.output_dir) / "cache/latents")
            log.info(f"latent cache: {written} new entries in {cfg.output_dir}/cache/latents")
    return data


def export_model(parts, path: Path, dtype: str) -> None:
    """Save a diffusers-layout folder (what ``ldm txt2img`` and diffusers both load), with an
    ``ldm_model.json`` holding the defaults the model was built with (its T5-block length)."""
    save_folder(parts, Path(path), dtype=DTYPES[dtype])
    if parts.defaults:
        write_manifest(path, {"kind": "model", "defaults": parts.defaults})


class AutoencoderRoundTrip(torch.nn.Module):
    """pixels -> posterior -> z = mean + std * eps -> reconstruction, as one forward call."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, eps: torch.Tensor):
        dist = self.vae.encode_dist(pixels)
        recon = self.vae.decode_raw(dist.mean + dist.std * eps)
        return recon, dist.mean, dist.logvar


@torch.no_grad()
def calibrate_latent_scale(parts, data, device, log, batches: int = 4) -> None:
    """Set the VAE's scaling_factor to 1 / std of its latents (Rombach et al. 2022, App. G)."""
    zs = [
        parts.vae.encode_dist(data.images(10_000_000 + i)[0].to(device)).sample()
        for i in range(batches)
    ]
    std = torch.cat(zs).float().std().item()
    parts.vae.config.scaling_factor = 1.0 / std
    log.info(f"latent scaling factor set to {1.0 / std:.5f} (latent std {std:.4f})")
