"""A network (eps / v / x0 / flow-velocity prediction) as a sigma-space denoiser D(x, sigma).

EDM preconditioning (Karras et al. 2022, eq. 7 and Table 1): D(x, sigma) = c_skip x +
c_out F(c_in x, c_noise). A parametrisation is a small class giving c_skip, c_out, c_in, the
network's input and its training target; the Denoiser adds c_noise (the sigma <-> timestep map),
the network call and the training loss. Samplers, guidance and the trainer never see the
parametrisation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ldm.sampling.schedules import NoiseSchedule
from ldm.text.cond import Cond

INTERPOLATIONS = ("log", "linear", "nearest")

Scalings = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # c_skip, c_out, c_in


class Parametrisation:
    """What a network predicts, as EDM scalings; sigma broadcasts against x.

    The network's input is x_in = alpha x0 + sigma_in eps (``interpolant``); the sampler's x is
    x_in / c_in. ``target`` is what the network should output, written in closed form (not as
    (x0 - c_skip x) / c_out) so that training matches diffusers bit for bit. c_noise is the
    Denoiser's: the training-timestep table for discrete models, t * timestep_scale for flow.
    """

    name = ""

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        raise NotImplementedError

    def interpolant(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma_in) of the network's input x_in = alpha x0 + sigma_in eps."""
        raise NotImplementedError

    def target(self, x0, noise, alpha, sigma_in) -> torch.Tensor:
        raise NotImplementedError

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The sampler's x at noise level sigma (x_in / c_in)."""
        alpha, sigma_in = self.interpolant(sigma)
        return (alpha * x0 + sigma_in * noise) / self.scalings(sigma)[2]

    def output_to_denoised(self, x, sigma, out) -> torch.Tensor:
        """Network output -> denoised x0 (EDM eq. 7)."""
        c_skip, c_out, _ = self.scalings(sigma)
        return c_skip * x + c_out * out

    def denoised_to_output(self, x, sigma, denoised) -> torch.Tensor:
        """The inverse of ``output_to_denoised`` (guidance rescale works in the output space)."""
        c_skip, c_out, _ = self.scalings(sigma)
        return (denoised - c_skip * x) / c_out


class _VariancePreserving(Parametrisation):
    """Discrete-time VP models in k-diffusion's space: x = x0 + sigma eps, sigma^2 = (1-ab)/ab."""

    def c_in(self, sigma):
        return 1 / (sigma**2 + 1) ** 0.5  # sqrt(abar): back to the network's unit-variance input

    def interpolant(self, sigma):
        alpha = self.c_in(sigma)
        return alpha, sigma * alpha  # sqrt(abar), sqrt(1 - abar)

    def noised(self, x0, noise, sigma):
        return x0 + sigma * noise


class Epsilon(_VariancePreserving):
    """eps prediction (Ho et al. 2020): D = x - sigma eps_hat (Table 1, "VP" column)."""

    name = "epsilon"

    def scalings(self, sigma):
        return torch.ones_like(sigma), -sigma, self.c_in(sigma)

    def target(self, x0, noise, alpha, sigma_in):
        return noise


class VPrediction(_VariancePreserving):
    """v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022, sec. 4; k-diffusion's VDenoiser)."""

    name = "v_prediction"

    def scalings(self, sigma):
        return 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5, self.c_in(sigma)

    def target(self, x0, noise, alpha, sigma_in):
        return alpha * noise - sigma_in * x0  # diffusers' get_velocity


class Sample(_VariancePreserving):
    """x0 prediction: the network's output is the denoised estimate."""

    name = "sample"

    def scalings(self, sigma):
        return torch.zeros_like(sigma), torch.ones_like(sigma), self.c_in(sigma)

    def target(self, x0, noise, alpha, sigma_in):
        return x0


class Flow(Parametrisation):
    """Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024, eq. 1-3): x_t = (1 - t) x0 + t eps,
    sigma = t in [0, 1], the network predicts the velocity eps - x0, so D = x - t v."""

    name = "flow"

    def __init__(self, timestep_scale: float = 1000.0):
        self.timestep_scale = timestep_scale  # c_noise = t * scale (SD3: 1000; FLUX: 1)

    def scalings(self, sigma):
        return torch.ones_like(sigma), -sigma, torch.ones_like(sigma)

    def interpolant(self, sigma):
        return 1 - sigma, sigma

    def target(self, x0, noise, alpha, sigma_in):
        return noise - x0


PARAMETRISATIONS = {p.name: p for p in (Epsilon, VPrediction, Sample, Flow)}


def parametrisation(name: str | Parametrisation) -> Parametrisation:
    """A Parametrisation by its diffusers ``prediction_type`` name (or "flow")."""
    if isinstance(name, Parametrisation):
        return name
    if name not in PARAMETRISATIONS:
        raise ValueError(f"prediction type must be one of {tuple(PARAMETRISATIONS)}, got {name!r}")
    return PARAMETRISATIONS[name]()


class Denoiser(torch.nn.Module):
    """``denoiser(x, sigma, cond, concat=None) -> denoised`` around ``network(x_in, t, ctx)``."""

    def __init__(
        self,
        network: Callable[..., torch.Tensor],  # (x_in, t, encoder_hidden_states=, ...) -> output
        schedule: NoiseSchedule | None,  # training sigma table (None: flow, continuous t)
        interpolation: str = "log",  # sigma -> t: "log" (k-diffusion), "linear", "nearest"
        *,
        prediction: str | Parametrisation | None = None,  # None: the schedule's prediction_type
        dtype: torch.dtype | None = None,  # network compute dtype; x and sigma stay as given
    ):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}"
            )
        if prediction is None and schedule is None:
            raise ValueError("a Denoiser without a schedule needs prediction='flow'")
        self.network = network
        # transformers (SD3, FLUX) take the pooled text embedding as their own input
        self.takes_pooled = "pooled_projections" in _parameters(network)
        # FLUX.1-dev embeds its distilled guidance scale itself (LCM's U-Net: timestep_cond)
        self.takes_guidance = "guidance" in _parameters(network)
        self.parametrisation = parametrisation(prediction or schedule.prediction_type)
        self.prediction_type = self.parametrisation.name
        self.interpolation = interpolation
        self.dtype = None if dtype == torch.float32 else dtype
        self.continuous = isinstance(self.parametrisation, Flow)
        if not self.continuous:
            if schedule is None:
                raise ValueError(f"prediction {self.prediction_type!r} needs a NoiseSchedule")
            self.register_buffer("sigmas", schedule.sigmas.clone(), persistent=False)  # (T,) asc.
            self.register_buffer("log_sigmas", schedule.sigmas.double().log(), persistent=False)
            self.register_buffer("alphas_cumprod", schedule.alphas_cumprod, persistent=False)

    @property
    def sigma_min(self) -> torch.Tensor:
        return torch.tensor(0.0) if self.continuous else self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return torch.tensor(1.0) if self.continuous else self.sigmas[-1]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_noise: the fractional training timestep of each sigma (interpolated over the table)."""
        if self.continuous:
            return sigma * self.parametrisation.timestep_scale
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
        if self.continuous:
            return t.float() / self.parametrisation.timestep_scale
        t = t.double().clamp(0, len(self.sigmas) - 1)
        low = t.floor().long().clamp(max=len(self.sigmas) - 2)
        w = t - low
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]
        return log_sigma.exp().float()

    def output_to_denoised(self, x: torch.Tensor, sigma, out: torch.Tensor) -> torch.Tensor:
        """Network output -> denoised, sigma a scalar, (B,) or broadcastable to x."""
        return self.parametrisation.output_to_denoised(x, _per_sample(sigma, x), out)

    def denoised_to_output(self, x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
        """Denoised -> what the network would have output (guidance rescale's space)."""
        return self.parametrisation.denoised_to_output(x, _per_sample(sigma, x), denoised)

    def forward(
        self,
        x: torch.Tensor,  # (B, C, H, W) noisy latents in the sampler's space
        sigma: torch.Tensor | float,  # scalar or (B,)
        cond: Cond,  # context (B, L, D) and optional mask (B, L)
        concat: torch.Tensor | None = None,  # (B, 5, H, W) inpainting mask + masked latents
        skip_layers: list[int] | None = None,  # transformer blocks to leave out (SD3.5's SLG)
    ) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.reshape(-1).expand(x.shape[0])  # (B,)
        s = _per_sample(sigma, x)  # (B, 1, 1, 1), broadcasts over C, H, W
        c_skip, c_out, c_in = self.parametrisation.scalings(s)
        extra = {} if skip_layers is None else {"skip_layers": skip_layers}
        out = self._network(x * c_in, self.sigma_to_t(sigma), cond, concat, **extra)
        return c_skip * x + c_out * out.to(x.dtype)

    def training_pair(
        self,
        x0: torch.Tensor,  # (B, C, H, W) clean latents
        noise: torch.Tensor,  # (B, C, H, W) float32
        sigma: torch.Tensor,  # (B,) noise levels
        t: torch.Tensor | None = None,  # (B,) integer timesteps with sigma = sigmas[t]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(network input in x0's dtype, c_noise, float32 target) at noise level sigma.

        With integer ``t`` the input scales come from the abar table, as diffusers' add_noise
        reads them (Ho et al. 2020, eq. 4), and t itself is the network's timestep.
        """
        x0 = x0.float()
        if t is not None and not self.continuous:
            ab = self.alphas_cumprod.to(x0.device)[t.to(x0.device)].float().view(-1, 1, 1, 1)
            alpha, sigma_in, c_noise = ab.sqrt(), (1 - ab).sqrt(), t.to(x0.device)
        else:
            sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x0.device).reshape(-1)
            alpha, sigma_in = self.parametrisation.interpolant(_per_sample(sigma, x0))
            c_noise = self.sigma_to_t(sigma)
        x_in = alpha * x0 + sigma_in * noise
        return x_in, c_noise, self.parametrisation.target(x0, noise, alpha, sigma_in)

    def loss(
        self,
        x0: torch.Tensor,  # (B, C, H, W) clean latents
        noise: torch.Tensor,  # (B, C, H, W) float32 training noise
        sigma: torch.Tensor,  # (B,) noise levels
        cond: Cond,  # (B, L, D) context
        *,
        t: torch.Tensor | None = None,  # (B,) integer timesteps with sigma = sigmas[t]
        concat: torch.Tensor | None = None,  # inpainting channels
    ) -> torch.Tensor:
        """Per-sample MSE in the network's output space, (B,) float32 (k-diffusion's
        Denoiser.loss): ||F - target||^2 = ||D - x0||^2 / c_out^2 (EDM eq. 8 without weights)."""
        x_in, c_noise, target = self.training_pair(x0, noise, sigma, t)
        out = self._network(x_in.to(x0.dtype), c_noise, cond, concat)
        per_pixel = F.mse_loss(out.float(), target, reduction="none")
        return per_pixel.mean(dim=tuple(range(1, per_pixel.ndim)))

    def _network(self, x_in, c_noise, cond: Cond, concat, **kwargs) -> torch.Tensor:
        """F(x_in, c_noise): in ``dtype`` when given (then back to float32), mask passed on."""
        if concat is not None:  # 9-channel inpainting U-Nets see mask and masked latents unscaled
            x_in = torch.cat([x_in, concat.to(x_in.dtype)], dim=1)
        if self.dtype is not None:
            x_in = x_in.to(self.dtype)
        kwargs["encoder_hidden_states"] = cond.context
        if cond.mask is not None:
            kwargs["encoder_attention_mask"] = cond.mask
        if cond.time_ids is not None:  # SDXL added conditioning, in diffusers' calling form
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        elif self.takes_pooled:
            kwargs["pooled_projections"] = cond.pooled
        if cond.guidance is not None and self.takes_guidance:  # FLUX.1-dev: the raw scale
            kwargs["guidance"] = cond.guidance.to(x_in.device)
        elif cond.guidance is not None:  # LCM: the U-Net embeds w's sinusoidal features
            w = _guidance_embedding(self.network, cond.guidance.to(x_in.device))
            kwargs["timestep_cond"] = w.to(x_in.dtype)
        out = self.network(x_in, c_noise, **kwargs)
        out = getattr(out, "sample", out)  # diffusers' UNet returns an output record
        return out.float() if self.dtype is not None else out


def _parameters(network) -> tuple[str, ...]:
    """The keyword names a network's forward takes (none for a plain callable without them)."""
    try:
        return tuple(inspect.signature(getattr(network, "forward", network)).parameters)
    except (TypeError, ValueError):
        return ()


def _guidance_embedding(network, guidance: torch.Tensor) -> torch.Tensor:
    """LCM's w-embedding (Luo et al. 2023, sec. 4.2): sinusoidal features of w - 1, as diffusers'
    LatentConsistencyModelPipeline computes it, for a U-Net with ``time_cond_proj_dim``."""
    from ldm.models.layers import guidance_scale_embedding

    dim = getattr(network.config, "time_cond_proj_dim", None)
    if dim is None:
        raise ValueError("this network does not embed a guidance scale (no time_cond_proj_dim)")
    return guidance_scale_embedding(guidance.float() - 1, dim)


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma (scalar, (B,) or (B, 1, ...)) as (B, 1, ..., 1) in x's dtype."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    return s.expand(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
