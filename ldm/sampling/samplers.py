"""The sampler table: every fact about a sampler, declared once in its ``SamplerSpec``.

Names (k-diffusion/ComfyUI, A1111 labels and aliases), eta, noise, and how diffusers' scheduler
for it spaces timesteps and starts. The CLI help, request checks, the pipeline, the schedules and
the infotext all read this table; the functions themselves live in ``ldm.sampling.singlestep``
and ``ldm.sampling.multistep``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ldm.errors import LdmError
from ldm.sampling.consistency import sample_lcm, sample_tcd
from ldm.sampling.multistep import (
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_unipc,
)
from ldm.sampling.singlestep import (
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
)

if TYPE_CHECKING:  # schedules.py reads this table
    from ldm.sampling.schedules import NoiseSchedule


@dataclass(frozen=True)
class SamplerSpec:
    """Everything ldm knows about one sampler."""

    name: str  # k-diffusion / ComfyUI name, ldm's key everywhere: "dpmpp_2m"
    function: Callable[..., torch.Tensor]  # sample_<name>(denoise, x, sigmas, *, noise, ...)
    a1111: str  # A1111's label, written to infotexts: "DPM++ 2M"
    aliases: tuple[str, ...] = ()  # more names accepted for it (A1111's k_* names, ComfyUI's)
    # A1111 < 1.9 labels with the schedule folded in: ("DPM++ 2M Karras", "karras")
    named_schedules: tuple[tuple[str, str], ...] = ()
    # the ldm schedule A1111 >= 1.9 renders for "Schedule type: Automatic" (or none): the
    # sampler's options["scheduler"] in modules/sd_samplers_kdiffusion.py, else k-diffusion's
    # get_sigmas ("uniform"); "default" where A1111 runs the sampler on its own timesteps and
    # ignores the schedule type (DDIM, UniPC: 1 + k * T // N, diffusers' "leading" on SD configs)
    a1111_schedule: str = "uniform"
    # the A1111 schedule nearest to ldm's "default" (diffusers' spacing), written with
    # "Schedule spacing: diffusers" where A1111 has no schedule that is ldm's "default"
    a1111_nearest: str = "uniform"
    a1111_eta: str = "Eta"  # infotext label of its eta: A1111 calls DDIM/UniPC's "Eta DDIM"
    stochastic: bool = False  # draws fresh noise every step at its default eta
    eta: float | None = None  # default eta (None: the sampler takes no eta)
    multistep: bool = False  # diffusers spaces N + 1 timesteps and drops the last (DPM-Solver)
    spacing: str = "linspace"  # diffusers' class-default timestep_spacing (the checkpoint's wins)
    # diffusers' scheduler keeps k-space latents (x0 + sigma * eps) at fractional timesteps and
    # starts from sigma_0 * noise (the Euler family); the others start from VP-scaled noise
    k_space: bool = False
    final_sigma: bool = False  # last step lands on abar[0] when set_alpha_to_one is false
    # diffusers' scheduler class for it, and the config values that select it within the class
    scheduler_class: str = ""
    scheduler_match: tuple[tuple[str, object], ...] = ()
    # takes the model's sigma <-> training-timestep maps (sigma_to_t=, t_to_sigma=): LCM, TCD
    timestep_maps: bool = False
    # what a user who picks this sampler for a model made for another gets by default (few-step
    # samplers: their step count, guidance off); the model's own sampler keeps the model's
    defaults: tuple[tuple[str, object], ...] = ()
    flow: bool = False  # runs on rectified-flow models (SD3, FLUX) as ComfyUI runs it there
    # on a flow model its noise follows the flow interpolant (the function's flow=True form,
    # ComfyUI's RF branches): ancestral and SDE samplers
    flow_form: bool = False

    def options(self, schedule: NoiseSchedule, eta: float | None = None) -> dict:
        """Options that reproduce diffusers' scheduler here (eta None: the sampler's default)."""
        options = {"final_sigma": schedule.final_sigma} if self.final_sigma else {}
        if self.eta is not None:
            options["eta"] = self.eta if eta is None else eta
        if self.function is sample_lcm:
            options["timestep_scaling"] = schedule.timestep_scaling
        return options

    def flow_options(self, eta: float | None = None) -> dict:
        """Options on a flow model (no discrete table: no final sigma)."""
        options = {} if self.eta is None else {"eta": self.eta if eta is None else eta}
        return {**options, "flow": True} if self.flow_form else options


_ANCESTRAL = dict(stochastic=True, eta=1.0)
_FLOW_NOISE = dict(flow=True, flow_form=True)  # the noise of the flow interpolant there
# A1111's DDIM and UniPC (modules/sd_samplers_timesteps.py) ignore the schedule type
_A1111_TIMESTEPS = dict(a1111_schedule="default", a1111_nearest="default")
# diffusers' DPM-Solver spacing (N + 1 timesteps, the last dropped) is A1111's "SGM Uniform"
# rounded to whole timesteps
_DPM = dict(a1111_nearest="sgm_uniform")
SPECS: tuple[SamplerSpec, ...] = (
    SamplerSpec("ddim", sample_ddim, "DDIM", eta=0.0, a1111_eta="Eta DDIM", spacing="leading",
                final_sigma=True, scheduler_class="DDIMScheduler", **_A1111_TIMESTEPS),
    # not an A1111 sampler: A1111 renders an unknown "Sampler" as DPM++ 2M (docs/infotext.md)
    SamplerSpec("ddpm", sample_ddpm, "DDPM", stochastic=True, spacing="leading",
                scheduler_class="DDPMScheduler", **_A1111_TIMESTEPS),
    SamplerSpec("euler", sample_euler, "Euler", ("k_euler",), k_space=True,
                scheduler_class="EulerDiscreteScheduler", flow=True),
    SamplerSpec("euler_ancestral", sample_euler_ancestral, "Euler a",
                ("k_euler_a", "k_euler_ancestral"), k_space=True, **_ANCESTRAL, **_FLOW_NOISE,
                scheduler_class="EulerAncestralDiscreteScheduler"),
    SamplerSpec("heun", sample_heun, "Heun", ("k_heun",), k_space=True,
                scheduler_class="HeunDiscreteScheduler", flow=True),
    SamplerSpec("lms", sample_lms, "LMS", ("k_lms",), (("LMS Karras", "karras"),), k_space=True,
                scheduler_class="LMSDiscreteScheduler", flow=True),
    SamplerSpec("dpmpp_2m", sample_dpmpp_2m, "DPM++ 2M", ("k_dpmpp_2m",),
                (("DPM++ 2M Karras", "karras"),), a1111_schedule="karras", **_DPM, multistep=True,
                scheduler_class="DPMSolverMultistepScheduler", flow=True,
                scheduler_match=(("algorithm_type", "dpmsolver++"), ("solver_order", 2))),
    SamplerSpec("dpmpp_2m_sde", sample_dpmpp_2m_sde, "DPM++ 2M SDE", ("k_dpmpp_2m_sde",),
                (("DPM++ 2M SDE Karras", "karras"), ("DPM++ 2M SDE Exponential", "exponential")),
                a1111_schedule="exponential", **_DPM, multistep=True, **_ANCESTRAL, **_FLOW_NOISE,
                scheduler_class="DPMSolverMultistepScheduler",
                scheduler_match=(("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2))),
    SamplerSpec("dpmpp_3m_sde", sample_dpmpp_3m_sde, "DPM++ 3M SDE", ("k_dpmpp_3m_sde",),
                (("DPM++ 3M SDE Karras", "karras"), ("DPM++ 3M SDE Exponential", "exponential")),
                a1111_schedule="exponential", **_DPM, multistep=True, **_ANCESTRAL, **_FLOW_NOISE),
    SamplerSpec("unipc", sample_unipc, "UniPC", ("uni_pc",), a1111_eta="Eta DDIM",
                multistep=True, flow=True, scheduler_class="UniPCMultistepScheduler",
                **_A1111_TIMESTEPS),
    # few-step samplers for distilled models: LCM and TCD on LCM's 50 "original" timesteps,
    # Turbo (ADD, Sauer et al. 2023) as diffusers runs it: Euler a on trailing timesteps, no CFG
    SamplerSpec("lcm", sample_lcm, "LCM", ("k_lcm",), stochastic=True, spacing="lcm",
                timestep_maps=True, scheduler_class="LCMScheduler",
                defaults=(("steps", 4), ("guidance_scale", 1.0))),
    # not an A1111 sampler (A1111 renders it as DPM++ 2M); eta is TCD's gamma
    SamplerSpec("tcd", sample_tcd, "TCD", stochastic=True, eta=0.3, spacing="lcm",
                timestep_maps=True, scheduler_class="TCDScheduler",
                defaults=(("steps", 4), ("guidance_scale", 1.0))),
    SamplerSpec("turbo", sample_euler_ancestral, "Euler a", ("euler_a_turbo",), k_space=True,
                **_ANCESTRAL, spacing="trailing",
                defaults=(("steps", 1), ("guidance_scale", 1.0), ("schedule", "simple"))),
)  # fmt: skip
SPEC: dict[str, SamplerSpec] = {s.name: s for s in SPECS}
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {s.name: s.function for s in SPECS}


def _key(name: str) -> str:
    return " ".join(name.strip().lower().split())


# every accepted spelling (any case, any spacing) -> (ldm name, implied schedule or None)
_NAMES: dict[str, tuple[str, str | None]] = {}
for _s in SPECS:  # a label two samplers share (Turbo's "Euler a") reads as the first
    for _n in (_s.name, _s.a1111, *_s.aliases):
        _NAMES.setdefault(_key(_n), (_s.name, None))
    _NAMES.update({_key(n): (_s.name, schedule) for n, schedule in _s.named_schedules})


def resolve_sampler(name: str) -> tuple[str, str | None]:
    """A sampler name, A1111 label or alias (any case) -> (ldm name, implied schedule or None).

    "DPM++ 2M Karras" implies the karras schedule; every other name leaves the schedule to the
    caller.
    """
    found = _NAMES.get(_key(name))
    if found is None:
        raise LdmError(f"unknown sampler {name!r}; valid: {', '.join(names_help())}")
    return found


def sampler_spec(name: str) -> SamplerSpec:
    """The spec of an ldm sampler name or any accepted alias."""
    return SPEC[resolve_sampler(name)[0]]


def names_help() -> list[str]:
    """Names for help texts and error messages: ldm names, then A1111 labels."""
    names = [s.name for s in SPECS] + [s.a1111 for s in SPECS]
    return list(dict.fromkeys(names + [n for s in SPECS for n, _ in s.named_schedules]))


# diffusers' class defaults of the fields that select a sampler within a scheduler class
_SCHEDULER_DEFAULTS = {"algorithm_type": "dpmsolver++", "solver_order": 2}


def from_scheduler_config(config: dict) -> tuple[str, str] | None:
    """(sampler, schedule) that a diffusers scheduler config describes, or None if none does.

    A checkpoint's scheduler is its maker's choice of sampler (SDXL ships Euler); Karras sigmas
    in the config select the karras schedule.
    """
    for spec in SPECS:
        if spec.scheduler_class != config.get("_class_name"):
            continue
        if all(config.get(k, _SCHEDULER_DEFAULTS[k]) == v for k, v in spec.scheduler_match):
            return spec.name, "karras" if config.get("use_karras_sigmas") else "default"
    return None


def sampler_options(sampler: str, schedule: NoiseSchedule, eta: float | None = None) -> dict:
    """Options that make ``sampler`` reproduce diffusers' scheduler for this NoiseSchedule."""
    return sampler_spec(sampler).options(schedule, eta)
