"""Consistency models in k-diffusion's space: the LCM boundary conditions, the consistency
function f(x, sigma) built from a denoiser (Song et al. 2023, eq. 5; Luo et al. 2023, eq. 9),
and the few-step samplers that use them (LCM, TCD).

A consistency model's output is f = c_skip(t) x_vp + c_out(t) x0_hat, where x_vp = x /
sqrt(1 + sigma^2) is the VP-space latent and x0_hat the denoiser's output; c_skip(0) = 1 and
c_out(0) = 0 make f the identity at the data end. Both scalings are linear in x0_hat, so the
guided denoiser can be wrapped after guidance (guidance commutes with them). The samplers take
the model's sigma <-> timestep maps as arguments, since both methods are defined on the
training timesteps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm.sampling.noise import NoiseFn, require_noise

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
TimestepMap = Callable[[torch.Tensor], torch.Tensor]  # the model's sigma <-> training timestep

SIGMA_DATA = 0.5  # LCM's sigma_data (diffusers' LCMScheduler hard-codes it)


def boundary_scalings(
    t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = SIGMA_DATA
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at training timestep t, LCM's discrete form (Luo et al. 2023, sec. 4.1):
    with s = t * timestep_scaling, c_skip = sd^2 / (s^2 + sd^2), c_out = s / sqrt(s^2 + sd^2)."""
    s = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_denoised(
    x: torch.Tensor,  # (B, C, H, W) latents in k-space (x0 + sigma eps)
    sigma: torch.Tensor,  # scalar or (B,)
    t: torch.Tensor,  # scalar or (B,): the training timestep of sigma
    denoised: torch.Tensor,  # (B, C, H, W) the (guided) denoiser's x0 estimate at (x, sigma)
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """f(x, sigma) = c_skip x_vp + c_out x0_hat, in x's dtype."""
    c_skip, c_out = (_per_sample(c, x) for c in boundary_scalings(t, timestep_scaling))
    x_vp = x / (1 + _per_sample(sigma, x) ** 2) ** 0.5
    return c_skip * x_vp + c_out * denoised


def _per_sample(v, x: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, device=x.device).reshape(-1).expand(x.shape[0])
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def sample_lcm(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    sigma_to_t: TimestepMap,
    t_to_sigma: TimestepMap | None = None,  # unused: LCM noises to the sigmas it is given
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """LCM multistep sampling (Luo et al. 2023, Alg. 3): the consistency function f at each
    sigma, then fresh noise up to the next sigma; the last step returns f itself."""
    noise = require_noise(noise, "lcm") if len(sigmas) > 2 else noise
    n = len(sigmas) - 1
    for i in range(n):
        sigma = sigmas[i]
        denoised = denoise(x, sigma * x.new_ones([x.shape[0]]))
        t = sigma_to_t(sigma.reshape(1))
        denoised = consistency_denoised(x, sigma, t, denoised, timestep_scaling)
        if callback is not None:
            callback(i, n, x, denoised)
        x = denoised
        if sigmas[i + 1] > 0:  # VP: sqrt(ab') f + sqrt(1 - ab') z, in k-space f + sigma' z
            x = x + noise() * sigmas[i + 1]
    return x


def sample_tcd(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    sigma_to_t: TimestepMap,
    t_to_sigma: TimestepMap,
    eta: float = 0.3,
) -> torch.Tensor:
    """Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024,
    eq. 15): from sigma to the earlier timestep s = floor((1 - gamma) t') of the next t' along the
    DDIM direction, then noise from s back up to t'; ``eta`` is the paper's gamma.

    As diffusers' TCDScheduler, the last step lands on timestep 0 (abar[0], not 1) and returns
    that latent in VP scale.
    """
    noise = require_noise(noise, "tcd") if eta else noise
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma * x.new_ones([x.shape[0]]))
        if callback is not None:
            callback(i, n, x, denoised)
        eps = (x - denoised) / sigma
        t_next = sigma_to_t(sigma_next.reshape(1)).round() if sigma_next > 0 else sigma.new_zeros(1)
        sigma_s = t_to_sigma(torch.floor((1 - eta) * t_next)).to(x.dtype)
        x = denoised + sigma_s * eps
        if eta and i < n - 1:  # VP: sqrt(ab'/ab_s) x_s + sqrt(1 - ab'/ab_s) z
            x = x + noise() * (sigma_next**2 - sigma_s**2).clamp(min=0) ** 0.5
    return x / (1 + sigma_s**2) ** 0.5  # the VP latent at abar[0], decoded as the clean one
