"""One micro-batch's loss for each kind of stage: diffusion (the Denoiser's loss at sampled noise
levels, discrete timesteps or flow times, and its weighting) and the autoencoder's."""

from __future__ import annotations

import torch

from ldm.denoiser import Denoiser
from ldm.errors import ConfigError
from ldm.sampling.plan import noise_schedule
from ldm.train.batches import batch_latents
from ldm.train.config import StageConfig
from ldm.train.loss import (
    autoencoder_loss,
    flow_loss_weight,
    flow_training_sigmas,
    min_snr_weight,
    training_noise,
)


def training_denoiser(network, scheduler_config: dict, stage: StageConfig) -> Denoiser:
    """The Denoiser the stage's loss goes through: the model's discrete noise table and target
    (or the stage's prediction_type), or rectified flow for a FlowMatch scheduler config."""
    schedule = noise_schedule(scheduler_config)
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
    return Denoiser(network, None, prediction="flow")


def diffusion_loss_for_step(parts, st, g, index: int, device) -> tuple[torch.Tensor, dict]:
    """Sample latents, timesteps and noise for one micro-batch; return the weighted loss."""
    data, loss_cfg = st.data, st.config.loss
    batch = data.batch(index)
    latents = batch_latents(parts, batch, g, device)
    drop = torch.rand(len(batch.captions), generator=g) < data.config.caption_dropout  # (B,)
    cond = st.text(batch.captions, drop.tolist(), batch.sizes, device)
    den, n = st.denoiser, latents.shape[0]
    if den.continuous:  # flow: sigma from the stage's density, shifted as the model samples
        shift = float(parts.scheduler_config.get("shift", 1.0))
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
