"""Multistep exponential-integrator samplers in lambda = -log(sigma): DPM-Solver++ and UniPC.

Same contract as ``ldm.sampling.samplers``: ``sample_<name>(denoise, x, sigmas, *, noise=None,
callback=None, **options) -> x`` with x in k-space and sigmas descending to 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ldm.sampling.noise import NoiseFn, require_noise

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def _lam(sigma: float) -> float:
    return -math.log(sigma)  # half log-SNR, DPM-Solver's lambda (Lu et al. 2022, Sec. 3)


def _lam_alpha(sigma: float, sigma_next: float, flow: bool) -> tuple[float, float, float]:
    """(lambda(sigma), lambda(sigma_next), alpha(sigma_next)) for the SDE solvers.

    k-space: alpha = 1, lambda = -log sigma. Flow (x = (1 - sigma) x0 + sigma eps): alpha =
    1 - sigma, lambda = log((1 - sigma) / sigma), the half log-SNR ComfyUI's SDE samplers read
    from a flow model. Pure noise (sigma = 1) has lambda = -inf; ComfyUI moves that first sigma
    to just below 1 instead, here the step takes its h -> inf limit, which is exact.
    """
    if not flow:
        return _lam(sigma), _lam(sigma_next), 1.0
    lam = -math.inf if sigma >= 1 else math.log((1 - sigma) / sigma)
    return lam, math.log((1 - sigma_next) / sigma_next), 1 - sigma_next


def _denoise(denoise: Denoise, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return denoise(x, sigma * x.new_ones([x.shape[0]]))


def sample_dpmpp_2m(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, Alg. 2; first order on the first and last step."""
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _denoise(denoise, x, sigmas[i])
        if callback is not None:
            callback(i, n, x, denoised)
        if sigma_next == 0:  # lambda = inf: the exact step lands on the denoised estimate
            x = denoised
            continue
        h = _lam(sigma_next) - _lam(sigma)
        denoised_d = denoised
        if old_denoised is not None:
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
        old_denoised, h_last = denoised, h
    return x


def sample_dpmpp_2m_sde(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    flow: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, Lu et al. 2022 (Sec. 5) as k-diffusion; eta 0 is the ODE solver.

    ``flow``: lambda and alpha of a rectified-flow model (ComfyUI's form, ``_lam_alpha``)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    noise = require_noise(noise, "dpmpp_2m_sde") if eta else noise
    n = len(sigmas) - 1
    old_denoised, h_last, h = None, None, None
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _denoise(denoise, x, sigmas[i])
        if callback is not None:
            callback(i, n, x, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            lam, lam_next, alpha_next = _lam_alpha(sigma, sigma_next, flow)
            h = lam_next - lam
            eta_h = eta * h if eta else 0.0  # (0 * inf is nan at sigma = 1)
            phi_1 = -math.expm1(-h - eta_h)
            x = (sigma_next / sigma) * math.exp(-eta_h) * x + (alpha_next * phi_1) * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    c = alpha_next * (phi_1 / (-h - eta_h) + 1)
                    x = x + c * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_next * phi_1 * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise() * (sigma_next * (-math.expm1(-2 * eta_h)) ** 0.5 * s_noise)
        old_denoised, h_last = denoised, h
    return x


def sample_dpmpp_3m_sde(
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
    """DPM-Solver++(3M) SDE (Lu et al. 2022, third-order multistep, as k-diffusion).

    ``flow``: lambda and alpha of a rectified-flow model (ComfyUI's form, ``_lam_alpha``)."""
    noise = require_noise(noise, "dpmpp_3m_sde") if eta else noise
    n = len(sigmas) - 1
    denoised_1, denoised_2, h, h_1, h_2 = None, None, None, None, None
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _denoise(denoise, x, sigmas[i])
        if callback is not None:
            callback(i, n, x, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            lam, lam_next, alpha_next = _lam_alpha(sigma, sigma_next, flow)
            h = lam_next - lam
            h_eta = h * (eta + 1)
            if flow:  # ComfyUI's general form; k-space (alpha 1) keeps k-diffusion's algebra
                eta_h = eta * h if eta else 0.0  # (0 * inf is nan at sigma = 1)
                x = (sigma_next / sigma) * math.exp(-eta_h) * x
                x = x - (alpha_next * math.expm1(-h_eta)) * denoised
            else:
                x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1  # h * phi_2(h), Lu et al. 2022 eq. 19
            if h_2 is not None:  # third order: two previous denoised estimates
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_next * phi_2) * d1 - (alpha_next * phi_3) * d2
            elif h_1 is not None:
                x = x + (alpha_next * phi_2) * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = x + noise() * (sigma_next * (-math.expm1(-2 * h * eta)) ** 0.5 * s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def _unipc_coefficients(rks: list[float], hh: float, order: int, predictor: bool) -> list[float]:
    """rho coefficients of UniPC's B(h) = e^h - 1 variant (Zhao et al. 2023, Alg. 2, "bh2")."""
    if order == 1 and not predictor:
        return [0.5]
    if order == 2 and predictor:
        return [0.5]
    if order == 1 and predictor:  # plain DPM-Solver++(1) / DDIM step: no correction terms
        return []
    b_h = math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1
    factorial = 1
    b = []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r = torch.tensor([[rk**k for rk in rks] for k in range(order)], dtype=torch.float64)
    b = torch.tensor(b, dtype=torch.float64)
    if predictor:  # the predictor does not know D at the new point: drop its row and column
        r, b = r[:-1, :-1], b[:-1]
    return torch.linalg.solve(r, b).tolist()


def _unipc_update(
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    history: list[tuple[float, torch.Tensor]],
    order: int,
    denoised_next: torch.Tensor | None = None,
) -> torch.Tensor:
    """One UniP step (denoised_next None) or UniC correction from sigma to sigma_next."""
    m0 = history[-1][1]
    h = _lam(sigma_next) - _lam(sigma)
    hh = -h  # data prediction (UniPC with x0 model, diffusers' predict_x0=True)
    rks, d1s = [], []
    for k in range(1, order):
        sigma_k, m_k = history[-1 - k]
        rk = (_lam(sigma_k) - _lam(sigma)) / h
        rks.append(rk)
        d1s.append((m_k - m0) / rk)
    rks.append(1.0)
    rhos = _unipc_coefficients(rks, hh, order, predictor=denoised_next is None)
    b_h = math.expm1(hh)
    x_next = (sigma_next / sigma) * x - math.expm1(hh) * m0
    if denoised_next is None:
        res = sum(rho * d for rho, d in zip(rhos, d1s)) if d1s else 0
    else:
        res = sum(rho * d for rho, d in zip(rhos[:-1], d1s)) + rhos[-1] * (denoised_next - m0)
    return x_next - b_h * res


def sample_unipc(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    order: int = 2,
) -> torch.Tensor:
    """UniPC, Zhao et al. 2023: UniP-``order`` predictor + UniC corrector (bh2), as diffusers'
    UniPCMultistepScheduler defaults (predict_x0, lower_order_final, no corrector after the end)."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    n = len(sigmas) - 1
    history: list[tuple[float, torch.Tensor]] = []  # (sigma, denoised), newest last
    x_last, last_order = None, 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _denoise(denoise, x, sigmas[i])
        if callback is not None:
            callback(i, n, x, denoised)
        if x_last is not None:  # UniC: correct x_i with the fresh D(x_i), no extra evaluation
            x = _unipc_update(x_last, float(sigmas[i - 1]), sigma, history, last_order, denoised)
        history = (
            [*history[-(order - 1) :], (sigma, denoised)] if order > 1 else [(sigma, denoised)]
        )
        this_order = min(order, n - i, i + 1)  # warm-up and lower_order_final
        x_last, last_order = x, this_order
        if sigma_next == 0:  # lambda = inf: the first-order step lands on the denoised estimate
            x = denoised
        else:
            x = _unipc_update(x, sigma, sigma_next, history, this_order)
    return x
