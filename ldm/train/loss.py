"""Training objectives around the Denoiser's loss: its per-timestep weighting (min-SNR), the
training noise (offset and pyramid terms), and the autoencoder loss (reconstruction + small KL).

The diffusion loss itself (noisy input, eps / v / x0 target) is ``ldm.denoiser.Denoiser.loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
