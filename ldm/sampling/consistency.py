"""Consistency models in k-diffusion's space: the LCM boundary conditions and the consistency
function f(x, sigma) built from a denoiser (Song et al. 2023, eq. 5; Luo et al. 2023, eq. 9).

A consistency model's output is f = c_skip(t) x_vp + c_out(t) x0_hat, where x_vp = x /
sqrt(1 + sigma^2) is the VP-space latent and x0_hat the denoiser's output; c_skip(0) = 1 and
c_out(0) = 0 make f the identity at the data end. Both scalings are linear in x0_hat, so the
guided denoiser can be wrapped after guidance (guidance commutes with them).
"""

from __future__ import annotations

import torch

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
