"""Noise schedules: training betas, the NoiseSchedule record, and sigma schedules for sampling.

Sigmas live in k-diffusion's space: x = x0 + sigma * eps, with sigma = sqrt((1 - abar) / abar)
for a discrete-time (VP) model whose cumulative alpha product is abar. A sigma schedule is a
descending float32 tensor ending in exactly one 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ldm.errors import ConfigError, LdmError
from ldm.sampling.samplers import SPEC, sampler_spec

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
SIGMA_SCHEDULES = ("default", "uniform", "karras", "exponential", "sgm_uniform", "simple", "beta")


def make_betas(
    beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float
) -> torch.Tensor:
    """Training betas in float32, computed as diffusers computes them (for bitwise-equal tables)."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17, beta <= 0.999

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ConfigError(f"beta_schedule {beta_schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(abar) so the last timestep has SNR 0 (Lin et al. 2023, Alg. 1)."""
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))  # keeps abar[0], zeroes abar[-1]
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


@dataclass
class NoiseSchedule:
    """A discrete-time diffusion schedule as read from a diffusers scheduler config."""

    betas: torch.Tensor  # (T,) float32 training betas
    prediction_type: str = "epsilon"  # what the network predicts: epsilon | v_prediction | sample
    timestep_spacing: str | None = None  # None: each sampler's diffusers class default
    steps_offset: int = 0  # added to "leading" timesteps (1 for SD 1.x)
    set_alpha_to_one: bool = True  # DDIM's last step lands on abar = 1 (else on abar[0])
    rescale_betas_zero_snr: bool = False  # informational; betas are already rescaled
    original_inference_steps: int = 50  # LCM/TCD: the distillation's timestep grid (T // 50 apart)
    timestep_scaling: float = 10.0  # LCM: t scale inside the boundary conditions c_skip, c_out
    alphas_cumprod: torch.Tensor = field(init=False)  # (T,) float32
    sigmas: torch.Tensor = field(init=False)  # (T,) float32 training sigma table, ascending

    def __post_init__(self) -> None:
        abar = torch.cumprod(1.0 - self.betas.float(), dim=0)
        if self.rescale_betas_zero_snr:
            # abar[-1] = 0 would be sigma = inf; diffusers' Euler uses the same tiny floor
            abar[-1] = 2**-24
        self.alphas_cumprod = abar
        self.sigmas = ((1 - abar) / abar) ** 0.5

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @property
    def final_sigma(self) -> float:
        """Where DDIM's last step lands: 0, or sigma(abar[0]) when set_alpha_to_one is false."""
        return 0.0 if self.set_alpha_to_one else self.sigma_min

    @classmethod
    def from_scheduler_config(cls, cfg: dict, **overrides) -> NoiseSchedule:
        """Read a diffusers ``scheduler_config.json`` dict (keys it does not use are ignored)."""
        unknown = sorted(set(overrides) - set(_CONFIG_DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown scheduler override(s): {', '.join(unknown)}")
        c = {**_CONFIG_DEFAULTS, **{k: v for k, v in cfg.items() if k in _CONFIG_DEFAULTS}}
        c.update(overrides)
        for key, valid in (
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", (None, *TIMESTEP_SPACINGS)),
        ):
            if c[key] not in valid:
                raise ConfigError(
                    f"scheduler config: {key} {c[key]!r} is not one of "
                    f"{', '.join(str(v) for v in valid if v)}"
                )
        if c["trained_betas"] is not None:
            betas = torch.tensor(c["trained_betas"], dtype=torch.float32)
        else:
            betas = make_betas(
                c["beta_schedule"], int(c["num_train_timesteps"]), c["beta_start"], c["beta_end"]
            )
        if c["rescale_betas_zero_snr"]:
            betas = rescale_zero_terminal_snr(betas)
        return cls(
            betas=betas,
            prediction_type=c["prediction_type"],
            timestep_spacing=c["timestep_spacing"],
            steps_offset=int(c["steps_offset"]),
            set_alpha_to_one=bool(c["set_alpha_to_one"]),
            rescale_betas_zero_snr=bool(c["rescale_betas_zero_snr"]),
            original_inference_steps=int(c["original_inference_steps"]),
            timestep_scaling=float(c["timestep_scaling"]),
        )


_CONFIG_DEFAULTS = dict(
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    num_train_timesteps=1000,
    trained_betas=None,
    prediction_type="epsilon",
    timestep_spacing=None,
    steps_offset=0,
    rescale_betas_zero_snr=False,
    set_alpha_to_one=True,
    original_inference_steps=50,
    timestep_scaling=10.0,
)


def get_sigmas(
    name: str, num_steps: int, schedule: NoiseSchedule, sampler: str = "euler"
) -> torch.Tensor:
    """Descending float32 sigmas of length num_steps + 1, ending in exactly one 0.

    "default" reproduces the timesteps of diffusers' scheduler class for ``sampler`` built with
    ``from_config`` on this checkpoint (its timestep_spacing, else the class default, and
    steps_offset). "uniform" is k-diffusion's ``get_sigmas`` (A1111's "Uniform", and what A1111's
    "Automatic" means for Euler, Euler a, Heun and LMS): log-sigma interpolation at fractional t.
    Known deviation: diffusers' DDIM/DDPM with linspace or trailing spacing step to
    ``t - T // N`` instead of the next listed timestep when N does not divide T; we use the list.
    "karras", "exponential" and "beta" span the full training range (as k-diffusion and
    DPM-Solver; diffusers' Euler-family schedulers span only their interpolated timesteps).
    """
    if num_steps < 1:
        raise LdmError(f"--steps must be at least 1, got {num_steps}")
    if sampler not in SPEC:
        raise LdmError(f"unknown sampler {sampler!r}; valid: {', '.join(SPEC)}")
    table = schedule.sigmas.double().numpy()
    s_min, s_max = float(table[0]), float(table[-1])
    if name == "default":
        sigmas = np.interp(
            default_timesteps(num_steps, schedule, sampler), np.arange(len(table)), table
        )
    elif name == "uniform":  # k-diffusion's get_sigmas: N points uniform in t from T-1 to 0
        t = np.linspace(len(table) - 1, 0, num_steps)
        sigmas = np.exp(np.interp(t, np.arange(len(table)), np.log(table)))
    elif name == "karras":  # Karras et al. 2022, eq. 5, rho = 7
        ramp = np.linspace(0, 1, num_steps)
        lo, hi = s_min ** (1 / 7), s_max ** (1 / 7)
        sigmas = (hi + ramp * (lo - hi)) ** 7
    elif name == "exponential":  # uniform in log sigma
        sigmas = np.exp(np.linspace(math.log(s_max), math.log(s_min), num_steps))
    elif name == "sgm_uniform":  # uniform in t from T-1 to 0 (ComfyUI sgm_uniform)
        t = np.linspace(len(table) - 1, 0, num_steps + 1)[:-1]
        sigmas = np.exp(np.interp(t, np.arange(len(table)), np.log(table)))
    elif name == "simple":  # diffusers timestep_spacing="trailing"
        sigmas = table[_spaced_timesteps("trailing", num_steps, len(table), 0).astype(int)]
    elif name == "beta":  # Lee et al. 2024, alpha = beta = 0.6, as diffusers' use_beta_sigmas
        from scipy.stats import beta

        ppf = beta.ppf(1 - np.linspace(0, 1, num_steps), 0.6, 0.6)
        sigmas = s_min + ppf * (s_max - s_min)
    else:
        raise LdmError(f"unknown schedule {name!r}; valid: {', '.join(SIGMA_SCHEDULES)}")
    return torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))


def default_timesteps(num_steps: int, schedule: NoiseSchedule, sampler: str) -> np.ndarray:
    """The (descending) timesteps diffusers' scheduler class for ``sampler`` would use."""
    spec = SPEC[sampler]
    spacing = schedule.timestep_spacing or spec.spacing
    T = schedule.num_train_timesteps
    if spec.spacing == "lcm":  # LCMScheduler / TCDScheduler ignore timestep_spacing
        return lcm_timesteps(num_steps, T, schedule.original_inference_steps)
    if spec.multistep:  # DPM-Solver / UniPC space N + 1 points and drop the last
        if spacing == "linspace":
            return np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].copy()
        if spacing == "leading":
            ratio = T // (num_steps + 1)
            return (np.arange(0, num_steps + 1) * ratio)[::-1][:-1] + schedule.steps_offset
        return _spaced_timesteps(spacing, num_steps, T, schedule.steps_offset)
    if spacing == "linspace":
        # DDIM and DDPM round to integer timesteps; Euler, Heun, LMS keep fractional float32 ones
        if not spec.k_space:
            return np.linspace(0, T - 1, num_steps).round()[::-1].copy()
        return np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
    return _spaced_timesteps(spacing, num_steps, T, schedule.steps_offset)


def lcm_timesteps(num_steps: int, T: int, original_steps: int = 50) -> np.ndarray:
    """LCM's timesteps (Luo et al. 2023, sec. 4.3): ``num_steps`` evenly spaced indices into
    the descending grid k - 1, 2k - 1, ..., T - 1 (k = T // original_steps) it was distilled on."""
    if num_steps > original_steps:
        raise LdmError(f"--steps {num_steps} exceeds the {original_steps} timesteps LCM/TCD "
                       "sample from (the scheduler's original_inference_steps)")  # fmt: skip
    k = T // original_steps
    grid = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    return grid[np.floor(np.linspace(0, original_steps, num_steps, endpoint=False)).astype(int)]


def _spaced_timesteps(spacing: str, num_steps: int, T: int, steps_offset: int) -> np.ndarray:
    if spacing == "leading":  # Lin et al. 2023 Table 2: 1 + k * T // N (+ offset)
        return (np.arange(0, num_steps) * (T // num_steps))[::-1] + steps_offset
    # trailing: start from the last training step, Lin et al. 2023 Table 2
    return np.arange(T, 0, -T / num_steps).round() - 1


def timestep_interp(sampler: str, schedule_name: str) -> str:
    """How diffusers maps this schedule's sigmas to U-Net timesteps (for ``Denoiser``).

    "linear": the exact inverse of diffusers' ``np.interp(timesteps, arange, sigmas)`` (default
    schedules, fractional Euler/Heun/LMS timesteps); "nearest": DPM-Solver and UniPC round the
    timestep of Karras sigmas; "log": k-diffusion's log-sigma interpolation otherwise.
    """
    if schedule_name == "default":
        return "linear"
    if schedule_name == "karras" and sampler_spec(sampler).multistep:
        return "nearest"
    return "log"


def init_noise_scale(
    sigmas: torch.Tensor, schedule: NoiseSchedule, sampler: str, schedule_name: str = "default"
) -> float:
    """The factor diffusers' scheduler puts on unit noise to make the first latent (in k-space).

    VP-space schedulers (DDIM, DDPM, DPM-Solver, UniPC) start from unit noise at abar, which is
    sqrt(sigma_0^2 + 1) in k-space; Euler-family ones use sigma_0 unless the spacing is "leading".
    """
    sigma0 = float(sigmas[0])
    spec = sampler_spec(sampler)
    spacing = schedule.timestep_spacing or spec.spacing
    if schedule_name == "simple":  # trailing timesteps whatever the config says (Turbo)
        spacing = "trailing"
    if spec.k_space and spacing in ("linspace", "trailing"):
        return sigma0
    return (sigma0**2 + 1) ** 0.5


def part_of_schedule(
    sigmas: torch.Tensor,  # (n + 1,) descending, ending in 0
    timesteps: torch.Tensor,  # (n,) the timestep of each step's starting sigma
    num_train_timesteps: int,
    start: float | None = None,
    end: float | None = None,
) -> torch.Tensor:
    """The sigmas of diffusers' ``denoising_end`` (a base) or ``denoising_start`` (a refiner).

    Both cut where the timestep falls below (1 - fraction) * T: the base runs the steps at or
    above it and ends at the cut sigma; the refiner runs from that sigma to the end.
    """
    fraction = end if end is not None else start
    T = num_train_timesteps
    cutoff = int(round(T - fraction * T))
    before = int((timesteps >= cutoff).sum())  # steps the base runs
    if end is not None:
        if before == 0:
            raise LdmError(f"--denoising-end {end} leaves no step to run")
        return sigmas[: before + 1]
    if before >= len(sigmas) - 1:
        raise LdmError(f"--denoising-start {start} leaves no step to run")
    return sigmas[before:]
