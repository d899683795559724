"""A discrete-time network (eps / v / sample prediction) as a sigma-space denoiser D(x, sigma).

k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser idea in one adapter (Karras et al.
2022, Table 1 "VP" column): the sampler's x = x0 + sigma * eps is scaled by c_in = 1/sqrt(sigma^2+1)
into the network's variance-preserving input, sigma becomes a training timestep t, and the output
becomes the denoised estimate. Samplers never see the parametrisation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm.sampling.schedules import NoiseSchedule
from ldm.text.cond import Cond

INTERPOLATIONS = ("log", "linear", "nearest")


def output_to_denoised(
    prediction_type: str, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Network output -> denoised x0, with sigma broadcastable to x (k-space)."""
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":  # Salimans & Ho 2022: v = alpha eps - sigma_vp x0
        return x / (sigma**2 + 1) - out * sigma / (sigma**2 + 1) ** 0.5
    return out  # "sample": the network predicts x0


def denoised_to_output(
    prediction_type: str, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor
) -> torch.Tensor:
    """The inverse of ``output_to_denoised`` (used by guidance rescale in the network's space)."""
    if prediction_type == "epsilon":
        return (x - denoised) / sigma
    if prediction_type == "v_prediction":
        return (x / (sigma**2 + 1) - denoised) * (sigma**2 + 1) ** 0.5 / sigma
    return denoised


class Denoiser(torch.nn.Module):
    """``denoiser(x, sigma, cond, concat=None) -> denoised`` around ``network(x_in, t, ctx)``."""

    def __init__(
        self,
        network: Callable[..., torch.Tensor],  # (x_in, t, encoder_hidden_states=, ...) -> output
        schedule: NoiseSchedule,  # training sigma table and prediction type
        interpolation: str = "log",  # sigma -> t: "log" (k-diffusion), "linear", "nearest"
    ):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}"
            )
        self.network = network
        self.prediction_type = schedule.prediction_type
        self.interpolation = interpolation
        self.register_buffer("sigmas", schedule.sigmas.clone(), persistent=False)  # (T,) ascending
        self.register_buffer("log_sigmas", schedule.sigmas.double().log(), persistent=False)

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional training timestep of each sigma, interpolated over the training table."""
        table = self.log_sigmas if self.interpolation != "linear" else self.sigmas.double()
        s = sigma.double()
        s = s.log() if self.interpolation != "linear" else s
        # index of the table entry at or below s, so that [low, low + 1] brackets it
        low = (s[None] >= table[:, None]).sum(0).sub(1).clamp(0, len(table) - 2)
        lo, hi = table[low], table[low + 1]
        w = ((s - lo) / (hi - lo)).clamp(0, 1)
        t = low + w
        if self.interpolation == "nearest":  # diffusers rounds the log-interpolated timestep
            t = t.round()
        return t.to(sigma.dtype if sigma.is_floating_point() else torch.float32)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma of a fractional timestep by log-sigma interpolation (k-diffusion)."""
        t = t.double().clamp(0, len(self.sigmas) - 1)
        low = t.floor().long().clamp(max=len(self.sigmas) - 2)
        w = t - low
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]
        return log_sigma.exp().float()

    def forward(
        self,
        x: torch.Tensor,  # (B, C, H, W) noisy latents in k-space
        sigma: torch.Tensor | float,  # scalar or (B,)
        cond: Cond,  # context (B, L, D) and optional mask (B, L)
        concat: torch.Tensor | None = None,  # (B, 5, H, W) inpainting mask + masked latents
    ) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.reshape(-1).expand(x.shape[0])  # (B,)
        s = sigma.to(x.dtype)[:, None, None, None]  # (B, 1, 1, 1), broadcasts over C, H, W
        x_in = x / (s**2 + 1) ** 0.5  # c_in: back to the network's variance-preserving input
        if concat is not None:  # 9-channel inpainting U-Nets see mask and masked latents unscaled
            x_in = torch.cat([x_in, concat.to(x_in.dtype)], dim=1)
        kwargs = {"encoder_hidden_states": cond.context}
        if cond.mask is not None:
            kwargs["encoder_attention_mask"] = cond.mask
        out = self.network(x_in, self.sigma_to_t(sigma), **kwargs)
        out = getattr(out, "sample", out)  # diffusers' UNet returns an output record
        return output_to_denoised(self.prediction_type, x, s, out.to(x.dtype))
