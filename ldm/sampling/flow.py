"""Sigma schedules for rectified-flow models (SD3, FLUX): x = (1 - sigma) x0 + sigma eps.

sigma is the flow time t in [0, 1] (the network sees t * 1000, see ``ldm.denoiser.Flow``); a
model's scheduler config moves its steps toward the noise end by a static ``shift`` or, for
FLUX-like configs, by a resolution-dependent ``mu`` (Esser et al. 2024, Sec. 5.3.2). "default"
reproduces diffusers' ``FlowMatchEulerDiscreteScheduler``; the other names are ComfyUI's
schedulers over its flow sigma table (``ModelSamplingDiscreteFlow`` / ``ModelSamplingFlux``).
Like every ldm schedule, the result is a descending float32 tensor ending in exactly one 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ldm.errors import ConfigError, LdmError

FLOW_SCHEDULES = ("default", "uniform", "karras", "exponential", "sgm_uniform", "simple", "beta")

# FlowMatchEulerDiscreteScheduler's class defaults for the keys ldm reads
_DEFAULTS = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=False,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    invert_sigmas=False,
    shift_terminal=None,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    time_shift_type="exponential",
)


@dataclass(frozen=True)
class FlowShift:
    """t -> sigma: the static shift s t / (1 + (s - 1) t) (SD3 paper eq. 23, with s = sqrt(m/n)),
    or, with ``mu``, the exponential time shift e^mu / (e^mu + (1/t - 1)) (FLUX; diffusers'
    ``time_shift_type="linear"``: mu / (mu + (1/t - 1)))."""

    shift: float = 1.0  # static shift s (SD3: 3.0)
    mu: float | None = None  # dynamic shift from the image size (FLUX); None: static
    time_shift_type: str = "exponential"  # how mu acts: "exponential" or "linear"

    def __call__(self, t):
        if self.mu is None:
            return self.shift * t / (1 + (self.shift - 1) * t)
        scale = math.exp(self.mu) if self.time_shift_type == "exponential" else self.mu
        return scale / (scale + (1 / t - 1))


def flow_config(scheduler_config: dict) -> dict:
    """The config keys ldm reads, with diffusers' class defaults; values it cannot honour raise."""
    c = {**_DEFAULTS, **{k: v for k, v in scheduler_config.items() if k in _DEFAULTS}}
    if c["invert_sigmas"]:  # Mochi's inverted schedule: sigma 0 would be pure noise
        raise ConfigError("scheduler config: invert_sigmas=true is not supported by ldm")
    if c["time_shift_type"] not in ("exponential", "linear"):
        raise ConfigError(
            f"scheduler config: time_shift_type {c['time_shift_type']!r} is not one of "
            "exponential, linear"
        )
    flags = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if c[k]]
    if len(flags) > 1:
        raise ConfigError(f"scheduler config: only one of {', '.join(flags)} can be set")
    return c


def flow_mu(scheduler_config: dict, image_seq_len: int) -> float:
    """Resolution-dependent shift: linear in the image's token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as the SD3 and FLUX
    pipelines' ``calculate_shift`` (and ComfyUI's ModelSamplingFlux node) compute it."""
    c = flow_config(scheduler_config)
    slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    return image_seq_len * slope + (c["base_shift"] - slope * c["base_image_seq_len"])


def flow_shift(scheduler_config: dict, image_seq_len: int | None = None) -> FlowShift:
    """The config's t -> sigma map; dynamic shifting needs the image's token count."""
    c = flow_config(scheduler_config)
    if not c["use_dynamic_shifting"]:
        return FlowShift(shift=float(c["shift"]))
    if image_seq_len is None:
        raise LdmError("this flow model shifts its schedule by image size: pass image_seq_len")
    return FlowShift(mu=flow_mu(c, image_seq_len), time_shift_type=c["time_shift_type"])


def flow_sigmas(
    name: str,
    num_steps: int,
    scheduler_config: dict,  # the model's scheduler/scheduler_config.json
    *,
    image_seq_len: int | None = None,  # image tokens (latent h * w / patch^2); dynamic shift only
    pipeline_sigmas: bool = False,  # "default" as FluxPipeline: linspace(1, 1/N, N), shifted once
) -> torch.Tensor:
    """Descending float32 sigmas of a flow model, ending in exactly one 0.

    "default" is diffusers' ``FlowMatchEulerDiscreteScheduler.from_config(config)
    .set_timesteps(num_steps, mu=mu)`` (StableDiffusion3Pipeline), or with ``pipeline_sigmas``
    ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu)`` (FluxPipeline); the others follow
    ComfyUI's schedulers for flow models.
    """
    if num_steps < 1:
        raise LdmError(f"--steps must be at least 1, got {num_steps}")
    c = flow_config(scheduler_config)
    fn = flow_shift(c, image_seq_len)
    if name == "default":
        sigmas = _diffusers_sigmas(num_steps, c, fn, pipeline_sigmas)
    elif name in FLOW_SCHEDULES:
        sigmas = _comfy_sigmas(name, num_steps, c, fn)
    else:
        raise LdmError(f"unknown schedule {name!r}; valid: {', '.join(FLOW_SCHEDULES)}")
    return torch.cat([torch.as_tensor(sigmas, dtype=torch.float32), torch.zeros(1)])


def _diffusers_sigmas(n: int, c: dict, fn: FlowShift, pipeline_sigmas: bool) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler: its training sigmas, spaced, shifted, converted."""
    if pipeline_sigmas:  # given sigmas skip the spacing below: shifted once, in float32
        sigmas = fn(np.linspace(1.0, 1 / n, n).astype(np.float32))
        return _converted(sigmas, n, c)
    T = int(c["num_train_timesteps"])
    # __init__: training sigmas t / T in float32, already shifted when the shift is static
    train = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
    if c["use_dynamic_shifting"]:
        sigma_max, sigma_min = train[0].item(), train[-1].item()
    else:
        shifted = fn.shift * train / (1 + (fn.shift - 1) * train)
        sigma_max, sigma_min = shifted[0].item(), shifted[-1].item()
    # set_timesteps: N sigmas evenly spaced between the (already shifted) ends, then shifted
    # again. diffusers' quirk, reproduced on purpose: with a static shift s the smallest sigma
    # is shift(shift(1 / T)), not shift(1 / T); the largest stays 1.
    return _converted(fn(np.linspace(sigma_max * T, sigma_min * T, n) / T), n, c)


def _converted(sigmas: np.ndarray, n: int, c: dict) -> np.ndarray:
    """set_timesteps after the shift: shift_terminal, then the karras/exponential/beta flags."""
    if c["shift_terminal"] and n > 1:  # stretch: the last sigma becomes shift_terminal (LTX)
        # (diffusers divides 0 by 0 here for one step; the single sigma 1 is left alone)
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - c["shift_terminal"]))
    lo, hi = float(sigmas[-1]), float(sigmas[0])
    if c["use_karras_sigmas"]:  # Karras et al. 2022, eq. 5, rho = 7, between the shifted ends
        ramp = np.linspace(0, 1, n)
        sigmas = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    elif c["use_exponential_sigmas"]:
        sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), n))
    elif c["use_beta_sigmas"]:  # Lee et al. 2024, alpha = beta = 0.6
        sigmas = lo + _beta_ppf(1 - np.linspace(0, 1, n)) * (hi - lo)
    return sigmas


def _comfy_table(c: dict, fn: FlowShift) -> torch.Tensor:
    """ComfyUI's ascending sigma table: the shift of t = i / T, i = 1..T, in float32.

    T is the model's num_train_timesteps (ModelSamplingDiscreteFlow, SD3) or 10000 for
    resolution-shifted models (ModelSamplingFlux)."""
    T = 10000 if fn.mu is not None else int(c["num_train_timesteps"])
    t = torch.arange(1, T + 1) / T
    return fn(t)


def _comfy_sigmas(name: str, n: int, c: dict, fn: FlowShift) -> np.ndarray:
    """ComfyUI's schedulers (comfy/samplers.py) for flow models, without the final 0."""
    table = _comfy_table(c, fn).double().numpy()
    s_min, s_max = float(table[0]), float(table[-1])
    if name == "simple":  # every (T / n)-th table entry from the top
        step = len(table) / n
        return table[[len(table) - 1 - int(k * step) for k in range(n)]]
    if name in ("uniform", "sgm_uniform"):
        # ComfyUI's "normal" / "sgm_uniform": t evenly spaced between the table's ends, then
        # shifted; the ends are already shifted, so it shifts twice, as diffusers' default does
        t = np.linspace(s_max, s_min, n) if name == "uniform" else np.linspace(s_max, s_min, n + 1)
        return fn(t[:n])
    if name == "karras":  # k-diffusion's get_sigmas_karras between the table's ends
        ramp = np.linspace(0, 1, n)
        return (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    if name == "exponential":
        return np.exp(np.linspace(math.log(s_max), math.log(s_min), n))
    # "beta": table entries at Beta(0.6, 0.6) quantiles of t (Lee et al. 2024), rounded to
    # whole entries; as ComfyUI, repeated entries are dropped, so a long schedule can be shorter
    idx = np.rint(_beta_ppf(1 - np.linspace(0, 1, n, endpoint=False)) * (len(table) - 1))
    keep = np.concatenate([[True], idx[1:] != idx[:-1]])
    return table[idx[keep].astype(int)]


def _beta_ppf(q: np.ndarray) -> np.ndarray:
    from scipy.stats import beta  # scipy only for the beta schedules

    return beta.ppf(q, 0.6, 0.6)
