"""One micro-batch's loss for each kind of stage: diffusion (the Denoiser's loss at sampled noise
levels, discrete timesteps or flow times, and its weighting) and the autoencoder's.

A flow model trains through the denoiser it samples with (``ldm.sampling.plan.make_denoiser``:
FLUX's 2 x 2 packing and t in [0, 1], SD3's t x 1000), at flow times shifted as it samples
(a static shift, or FLUX.1-dev's resolution-dependent one at the batch's token count), and a
FLUX.1-dev transformer sees ``loss.embedded_guidance_scale`` as its guidance input (docs/lora.md).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ldm.denoiser import Denoiser
from ldm.errors import ConfigError
from ldm.sampling.flow import flow_shift
from ldm.sampling.plan import make_denoiser, noise_schedule
from ldm.train.batches import batch_latents
from ldm.train.config import StageConfig
from ldm.train.loss import (
    autoencoder_loss,
    flow_loss_weight,
    flow_training_sigmas,
    min_snr_weight,
    training_noise,
)


def training_denoiser(network, parts, stage: StageConfig) -> Denoiser:
    """The Denoiser the stage's loss goes through (``network``: the parts' own, or its DDP
    wrapper): the model's discrete noise table and target (or the stage's prediction_type), or
    for a FlowMatch scheduler config the pipeline's flow denoiser for the model's family."""
    schedule = noise_schedule(parts.scheduler_config)
    shift = stage.loss.training_shift
    if shift is not None and (schedule is not None or not (math.isfinite(shift) and shift > 0)):
        raise ConfigError(f"stages.{stage.name}.loss.training_shift: a positive number, for a "
                          "flow model only")  # fmt: skip
    if schedule is not None:
        prediction = stage.loss.prediction_type or schedule.prediction_type
        return Denoiser(network, schedule, prediction=prediction)
    if "vae" in stage.train:  # an autoencoder stage never calls the denoiser
        return Denoiser(network, None, prediction="flow")
    if stage.loss.prediction_type is not None:
        raise ConfigError(f"stages.{stage.name}.loss.prediction_type: a flow model predicts "
                          "velocity; leave it unset")  # fmt: skip
    if stage.loss.min_snr_gamma is not None:
        raise ConfigError(f"stages.{stage.name}.loss.min_snr_gamma: set it to null for a flow "
                          "model (loss.sigma_sampling, loss.weighting shape its loss)")  # fmt: skip
    # a flow U-Net's family (sd1/sd2) has the defaults: t x 1000, no packing
    return make_denoiser(network, None, None, family=parts.family)


def training_shift(scheduler_config: dict, latent_shape: tuple, patch: int = 1) -> float:
    """The time shift s of sigma' = s t / (1 + (s - 1) t) the model samples this batch's size
    with: the scheduler's static ``shift``, or with dynamic shifting (FLUX.1-dev) e^mu at the
    batch's image tokens (h / patch) (w / patch), mu linear in them as FluxPipeline computes it;
    the exponential time shift e^mu / (e^mu + 1/t - 1) is the static one with s = e^mu."""
    h, w = latent_shape[-2:]
    fn = flow_shift(scheduler_config, image_seq_len=(h // patch) * (w // patch))
    if fn.mu is None:
        return fn.shift
    return math.exp(fn.mu) if fn.time_shift_type == "exponential" else fn.mu


def _with_guidance(parts, cond, n: int, scale: float):
    """FLUX.1-dev's distilled guidance input, the same scale for every row (diffusers'
    train_dreambooth_lora_flux passes ``guidance_scale`` the same way); others unchanged."""
    if not getattr(parts.unet.config, "guidance_embeds", False):
        return cond
    return dataclasses.replace(cond, guidance=torch.full((n,), float(scale)))


def diffusion_loss_for_step(parts, st, g, index: int, device) -> tuple[torch.Tensor, dict]:
    """Sample latents, timesteps and noise for one micro-batch; return the weighted loss."""
    data, loss_cfg = st.data, st.config.loss
    batch = data.batch(index)
    latents = batch_latents(parts, batch, g, device)
    drop = torch.rand(len(batch.captions), generator=g) < data.config.caption_dropout  # (B,)
    cond = st.text(batch.captions, drop.tolist(), batch.sizes, device)
    den, n = st.denoiser, latents.shape[0]
    if den.continuous:  # flow: sigma from the stage's density, shifted as the model samples
        cond = _with_guidance(parts, cond, n, loss_cfg.embedded_guidance_scale)
        shift = loss_cfg.training_shift
        if shift is None:
            shift = training_shift(parts.scheduler_config, latents.shape, parts.family.latent_patch)
        sigma = flow_training_sigmas(n, g, loss_cfg.sigma_sampling, loss_cfg.logit_mean,
                                     loss_cfg.logit_std, loss_cfg.mode_scale, shift)  # fmt: skip
    else:
        t = torch.randint(0, len(den.alphas_cumprod), (n,), generator=g)  # (B,)
    noise = training_noise(
        tuple(latents.shape), g, loss_cfg.noise_offset,
        loss_cfg.multires_noise_iterations, loss_cfg.multires_noise_discount,
    ).to(device)  # fmt: skip
    if den.continuous:
        per_sample = den.loss(latents, noise, sigma.to(device), cond)  # (B,)
        weight = flow_loss_weight(sigma, loss_cfg.weighting)
    else:
        per_sample = den.loss(latents, noise, den.sigmas[t], cond, t=t)  # (B,)
        weight = min_snr_weight(den.alphas_cumprod, t, loss_cfg.min_snr_gamma, den.prediction_type)
    return (per_sample * weight.to(device)).mean(), {}


def autoencoder_loss_for_step(parts, st, g, index: int, device):
    """Reconstruct one micro-batch through the posterior; return the VAE loss and its terms."""
    pixels, _ = st.data.images(index)
    pixels = pixels.to(device)
    f = parts.vae.factor
    latent_shape = (pixels.shape[0], parts.vae.latent_channels, pixels.shape[2] // f,
                    pixels.shape[3] // f)  # fmt: skip
    eps = torch.randn(latent_shape, generator=g)
    recon, mean, logvar = st.wrapped["vae"](pixels, eps.to(device))
    return autoencoder_loss(recon, pixels, mean, logvar, st.config.loss.kl_weight)
