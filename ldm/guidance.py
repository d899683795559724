"""Classifier-free guidance, written once: a denoiser with conds in, a guided denoiser out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldm.denoiser import Epsilon
from ldm.text.cond import Cond

GuidedDenoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SkipLayerGuidance:
    """SD3.5's skip-layer guidance (Stability's SD3.5 reference; diffusers'
    ``skip_guidance_layers``): D += scale (D_cond - D_cond without ``layers``) at the steps whose
    sigma lies in [sigma_lo, sigma_hi]. Linear in D, so equal to diffusers' velocity form."""

    layers: tuple[int, ...]  # transformer blocks left out of the extra pass (SD3.5-medium: 7-9)
    scale: float  # diffusers' skip_layer_guidance_scale (2.8)
    sigma_hi: float  # first and last sigma it is active at (diffusers: steps i with
    sigma_lo: float  # start * n < i < stop * n, start 0.01, stop 0.2)


def cfg(
    denoiser: Callable[..., torch.Tensor],  # denoiser(x, sigma, cond, concat=None) -> denoised
    cond: Cond,  # (B, L, D) conditioning, the prompts
    uncond: Cond,  # (B, L, D) unconditioning, the negative prompts (same L as cond)
    scale: float,  # guidance scale w; <= 1 runs the conditioned pass only
    rescale: float = 0.0,  # guidance rescale phi (Lin et al. 2023, eq. 15-16)
    batched: bool = True,  # cond and uncond in one network call; False saves memory
    concat: torch.Tensor | None = None,  # (B, 5, H, W) inpainting channels, shared by both passes
    slg: SkipLayerGuidance | None = None,  # SD3.5: a third pass without some blocks
) -> GuidedDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): D = D_u + w (D_c - D_u), as a closure.

    Guidance is linear, so combining denoised estimates equals diffusers' combination of eps or
    v predictions. The rescale is not linear: like diffusers' ``rescale_noise_cfg`` it matches the
    per-sample std of the guided prediction to the conditioned one in the network's own output
    space (eps for eps models, v for v models) through the denoiser's own ``denoised_to_output``
    and ``output_to_denoised`` (eps when the denoiser has none).
    """
    kwargs = {} if concat is None else {"concat": concat}
    if scale <= 1.0:  # diffusers: guidance only when scale > 1; scale 1 is the conditioned model

        def conditioned(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return denoiser(x, sigma, cond, **kwargs)

        return conditioned

    both = Cond.cat([uncond, cond]) if batched else None
    both_kwargs = {} if concat is None else {"concat": torch.cat([concat, concat])}
    space = denoiser if hasattr(denoiser, "denoised_to_output") else Epsilon()

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if batched:
            sigma2 = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
            out = denoiser(torch.cat([x, x]), torch.cat([sigma2, sigma2]), both, **both_kwargs)
            d_uncond, d_cond = out.chunk(2)  # diffusers' order: uncond first
        else:
            d_uncond = denoiser(x, sigma, uncond, **kwargs)
            d_cond = denoiser(x, sigma, cond, **kwargs)
        denoised = d_uncond + scale * (d_cond - d_uncond)
        if rescale > 0:
            denoised = _rescale(space, x, sigma, denoised, d_cond, rescale)
        if slg is not None and slg.sigma_lo <= float(sigma.reshape(-1)[0]) <= slg.sigma_hi:
            d_skip = denoiser(x, sigma, cond, skip_layers=list(slg.layers), **kwargs)
            denoised = denoised + slg.scale * (d_cond - d_skip)
        return denoised

    return guided


def _rescale(
    space,  # has denoised_to_output / output_to_denoised (a Denoiser or a Parametrisation)
    x: torch.Tensor,
    sigma: torch.Tensor,
    denoised: torch.Tensor,
    d_cond: torch.Tensor,
    rescale: float,
) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, eq. 15-16) in the network's output space."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    guided = space.denoised_to_output(x, s, denoised)
    positive = space.denoised_to_output(x, s, d_cond)
    dims = list(range(1, x.ndim))
    std_pos = positive.std(dim=dims, keepdim=True)  # eq. 15: per-sample std
    std_cfg = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_pos / std_cfg)
    out = rescale * rescaled + (1 - rescale) * guided  # eq. 16
    return space.output_to_denoised(x, s, out)
