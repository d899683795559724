"""Single-step samplers: plain functions walking descending sigmas (ending in 0) with D(x, sigma).

x lives in k-space (x = x0 + sigma * eps). Every sampler has the signature
``sample_<name>(denoise, x, sigmas, *, noise=None, callback=None, **options) -> x``; stochastic ones
draw only through ``noise()`` (see ``ldm.sampling.noise``). ``callback(i, num_steps, x, denoised)``
reports progress. Multistep DPM-Solver++ and UniPC live in ``ldm.sampling.multistep``; what else
is known about each sampler (names, eta, timestep family) is declared in ``ldm.sampling.samplers``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ldm.sampling.noise import NoiseFn, require_noise

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def _sigma_batch(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma * x.new_ones([x.shape[0]])  # (B,), as k-diffusion passes it


def sample_euler(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without 2nd order)."""
    n = len(sigmas) - 1
    for i in range(n):
        denoised = denoise(x, _sigma_batch(sigmas[i], x))
        if callback is not None:
            callback(i, n, x, denoised)
        d = (x - denoised) / sigmas[i]  # dx/dsigma, Karras et al. 2022 eq. 3
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def _ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split the step into a deterministic part to sigma_down plus fresh noise sigma_up."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def _flow_ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float, float]:
    """The ancestral split for x = (1 - sigma) x0 + sigma eps (ComfyUI's sample_euler_ancestral_RF).

    Step down to sigma_down = sigma_next (1 + (sigma_next / sigma - 1) eta), rescale the signal
    from 1 - sigma_down to 1 - sigma_next, and add the noise that brings its level back to
    sigma_next: sigma_up^2 = sigma_next^2 - (sigma_down (1 - sigma_next) / (1 - sigma_down))^2.
    Returns (sigma_down, sigma_up, signal rescale).
    """
    if not eta or sigma_next == 0:
        return sigma_next, 0.0, 1.0
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_ratio = (1 - sigma_next) / (1 - sigma_down)
    sigma_up = max(sigma_next**2 - (sigma_down * alpha_ratio) ** 2, 0.0) ** 0.5
    return sigma_down, sigma_up, alpha_ratio


def sample_euler_ancestral(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    flow: bool = False,
) -> torch.Tensor:
    """Ancestral Euler (k-diffusion's "Euler a"): an Euler step to sigma_down, then new noise.

    ``flow``: the rectified-flow split (ComfyUI's sample_euler_ancestral_RF), for models with
    x = (1 - sigma) x0 + sigma eps; the k-space split would add noise without shrinking the
    signal. The Euler step itself is the same ODE step in both spaces.
    """
    noise = require_noise(noise, "euler_ancestral") if eta else noise
    n = len(sigmas) - 1
    for i in range(n):
        denoised = denoise(x, _sigma_batch(sigmas[i], x))
        if callback is not None:
            callback(i, n, x, denoised)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if flow:
            sigma_down, sigma_up, alpha_ratio = _flow_ancestral_step(sigma, sigma_next, eta)
        else:
            (sigma_down, sigma_up), alpha_ratio = _ancestral_step(sigma, sigma_next, eta), 1.0
        x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        if alpha_ratio != 1.0:
            x = x * alpha_ratio
        if sigma_up > 0:
            x = x + noise() * (sigma_up * s_noise)
    return x


def sample_heun(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1, no churn); Euler on the last step."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, _sigma_batch(sigma, x))
        if callback is not None:
            callback(i, n, x, denoised)
        d = (x - denoised) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:  # the trapezoid needs D at sigma_next, undefined at 0
            x = x_euler
            continue
        d_next = (x_euler - denoise(x_euler, _sigma_batch(sigma_next, x))) / sigma_next
        x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


def _lms_coefficient(sigmas: np.ndarray, i: int, order: int, j: int) -> float:
    """Integral of the j-th Lagrange basis polynomial over [sigma_i, sigma_i+1], exactly."""
    nodes, weights = np.polynomial.legendre.leggauss(4)  # exact for degree <= 7 >= order - 1
    a, b = sigmas[i], sigmas[i + 1]
    tau = (b - a) / 2 * nodes + (a + b) / 2
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float((b - a) / 2 * (weights * basis).sum())


def sample_lms(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth in sigma), Karras et al. 2022 / k-diffusion, order 4."""
    sigmas_np = sigmas.double().cpu().numpy()
    ds: list[torch.Tensor] = []
    n = len(sigmas) - 1
    for i in range(n):
        denoised = denoise(x, _sigma_batch(sigmas[i], x))
        if callback is not None:
            callback(i, n, x, denoised)
        ds = (
            [*ds[-(order - 1) :], (x - denoised) / sigmas[i]]
            if order > 1
            else [(x - denoised) / sigmas[i]]
        )
        cur_order = min(i + 1, order)
        coeffs = [_lms_coefficient(sigmas_np, i, cur_order, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def sample_ddim(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
    final_sigma: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) in k-space; eta 0 is Euler in sigma, eta 1 is DDPM.

    ``final_sigma`` > 0 reproduces CompVis/diffusers with ``set_alpha_to_one=False``: the last step
    lands on abar[0] instead of 1, and that (slightly noisy) latent is returned in VP scale.
    """
    noise = require_noise(noise, "ddim") if eta else noise
    n = len(sigmas) - 1
    for i in range(n):
        sigma = float(sigmas[i])
        sigma_next = float(sigmas[i + 1])
        if i == n - 1 and sigma_next == 0:
            sigma_next = final_sigma
        denoised = denoise(x, _sigma_batch(sigmas[i], x))
        if callback is not None:
            callback(i, n, x, denoised)
        eps = (x - denoised) / sigma
        # eq. 16 variance, in VP terms abar = 1 / (1 + sigma^2), carried to k-space by 1/sqrt(abar)
        a_t, a_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        var = (1 - a_next) / (1 - a_t) * (1 - a_t / a_next)
        sigma_up = eta * var**0.5 / a_next**0.5
        sigma_down = max(sigma_next**2 - sigma_up**2, 0.0) ** 0.5
        x = denoised + sigma_down * eps
        if sigma_up > 0:
            x = x + noise() * sigma_up
    if float(sigmas[-1]) == 0 and final_sigma > 0:
        x = x / (1 + final_sigma**2) ** 0.5  # VP latent at abar[0], returned as the clean latent
    return x


def sample_ddpm(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, posterior variance beta-tilde) = DDIM with eta 1."""
    return sample_ddim(
        denoise, x, sigmas, noise=require_noise(noise, "ddpm"), callback=callback, eta=1.0
    )
