"""Training objectives around the Denoiser's loss: its per-timestep weighting (min-SNR), the
noise levels a flow model trains at (logit-normal, mode, uniform) and their weighting, the
training noise (offset and pyramid terms), and the autoencoder loss (reconstruction + small KL).

The diffusion loss itself (noisy input, eps / v / x0 target) is ``ldm.denoiser.Denoiser.loss``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FLOW_SIGMA_SAMPLING = ("logit_normal", "mode", "uniform")
FLOW_WEIGHTING = ("none", "sigma_sqrt", "cosmap")

# the factor between each target's loss and the x0-loss, as a function of SNR (see min_snr_weight)
SNR_DIVISORS = {
    "epsilon": lambda snr: snr,
    "v_prediction": lambda snr: snr + 1,
    "sample": lambda snr: torch.ones_like(snr),
}


def min_snr_weight(
    alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float | None, kind: str
) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, eq. 8) for an eps, v or x0 target.

    The weight is min(SNR, g) in x0 terms, with SNR = ab / (1 - ab). An eps-loss is SNR times the
    x0-loss and a v-loss (SNR + 1) times, so their weights are min(SNR, g) / SNR and
    min(SNR, g) / (SNR + 1).
    """
    if kind not in SNR_DIVISORS:
        raise ValueError(f"min-SNR weighting has no rule for prediction type {kind!r}")
    ab = alphas_cumprod.to(t.device)[t].float()
    snr = ab / (1 - ab)
    if gamma is None:
        return torch.ones_like(snr)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / SNR_DIVISORS[kind](snr)


def flow_training_sigmas(
    n: int,
    generator: torch.Generator,
    sampling: str = "logit_normal",
    mean: float = 0.0,  # logit-normal location m
    std: float = 1.0,  # logit-normal scale s
    mode_scale: float = 1.29,  # mode sampling's s
    shift: float = 1.0,  # the model's static time shift (its scheduler config's "shift")
) -> torch.Tensor:
    """(n,) flow times sigma in (0, 1) for one batch (Esser et al. 2024, sec. 3.1).

    logit_normal: sigma = sigmoid(u), u ~ N(m, s) (eq. 19; the paper's default m = 0, s = 1);
    mode: f_mode(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1) (eq. 20); uniform:
    sigma ~ U(0, 1). Then the static shift sigma' = shift sigma / (1 + (shift - 1) sigma) that
    the model samples with (eq. 23). Continuous times: diffusers' SD3 script rounds them onto its
    1000-step table first; a continuous sigma is the paper's and samples the same density.
    """
    if sampling == "logit_normal":
        sigma = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    elif sampling == "mode":
        u = torch.rand(n, generator=generator)
        sigma = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    elif sampling == "uniform":
        sigma = torch.rand(n, generator=generator)
    else:
        raise ValueError(f"sigma sampling must be one of {FLOW_SIGMA_SAMPLING}, got {sampling!r}")
    sigma = sigma.clamp(1e-5, 1 - 1e-5)  # both ends are degenerate (x_t = x0 or pure noise)
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_loss_weight(sigma: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """Per-sample weight of the velocity loss ||v_hat - (eps - x0)||^2 at flow time sigma.

    none: the rectified-flow loss as the paper trains it (its sigma density does the
    weighting); sigma_sqrt: 1 / sigma^2, the x0-loss (diffusers' "sigma_sqrt"); cosmap:
    2 / (pi (1 - 2 sigma + 2 sigma^2)) (Esser et al. 2024, eq. 21's density as a weight).
    """
    if weighting == "none":
        return torch.ones_like(sigma)
    if weighting == "sigma_sqrt":
        return sigma.float() ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise ValueError(f"flow loss weighting must be one of {FLOW_WEIGHTING}, got {weighting!r}")


def training_noise(
    shape: tuple[int, ...],
    generator: torch.Generator,
    offset: float,
    multires_iterations: int = 0,
    multires_discount: float = 0.3,
) -> torch.Tensor:
    """The training noise: Gaussian, plus optionally a per-channel constant (Guttenberg 2023
    "noise offset") and upsampled coarser noise ("multi-resolution" / pyramid noise, Whitaker
    2023; kohya's ``multires_noise_iterations`` / ``multires_noise_discount``).

    Pyramid noise: level i adds noise drawn at 1/r^i of the size (r uniform in [2, 4)),
    bilinearly upsampled and scaled by discount^i, stopping at 1x1; each sample is then
    rescaled to unit std, so x_t keeps the schedule's variance while its low frequencies carry
    more noise than white noise does.
    """
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn(shape[:2] + (1, 1), generator=generator)
    if multires_iterations:
        h, w = shape[-2:]
        for i in range(1, multires_iterations + 1):
            r = 2 + 2 * float(torch.rand((), generator=generator))
            hi, wi = max(1, int(h / r**i)), max(1, int(w / r**i))
            coarse = torch.randn(shape[:2] + (hi, wi), generator=generator)
            noise = noise + multires_discount**i * F.interpolate(
                coarse, size=(h, w), mode="bilinear", align_corners=False
            )
            if hi == 1 or wi == 1:
                break
        noise = noise / noise.flatten(1).std(dim=1).view(-1, *([1] * (len(shape) - 1)))
    return noise


def autoencoder_loss(
    recon: torch.Tensor,
    pixels: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    kl_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + L2 reconstruction plus kl_weight * KL(q(z|x) || N(0, I)) (Kingma & Welling 2014).

    No perceptual or adversarial term: both need downloaded networks (LPIPS, a discriminator
    pretrained elsewhere), and flat-colour data reconstructs well without them.
    """
    l1 = (recon.float() - pixels).abs().mean()
    l2 = F.mse_loss(recon.float(), pixels)
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).sum(dim=(1, 2, 3))
    loss = l1 + l2 + kl_weight * kl.mean()
    return loss, {"l1": l1.item(), "l2": l2.item(), "kl": kl.mean().item()}
