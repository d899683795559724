"""The sampler table: each entry consistent with its function, diffusers' class, and A1111."""

import inspect

import diffusers
import pytest
import torch
from test_infotext import BASE, a1111_parse

from ldm.errors import LdmError
from ldm.infotext import format_infotext, parse_infotext
from ldm.request import check_sampler
from ldm.sampling.noise import make_noise
from ldm.sampling.samplers import SAMPLERS, SPEC, SPECS, resolve_sampler, sampler_spec
from ldm.sampling.schedules import SIGMA_SCHEDULES, TIMESTEP_SPACINGS, NoiseSchedule

# the diffusers scheduler class each sampler reproduces (CONVENTIONS.md)
DIFFUSERS_CLASS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
    "dpmpp_3m_sde": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
    "turbo": "EulerAncestralDiscreteScheduler",  # with timestep_spacing="trailing"
}
PRESETS = {"turbo": "euler_ancestral"}  # a preset of another sampler's function and label
# A1111's LCM (sd_samplers_lcm.py) samples its own 50-timestep grid, which no ldm schedule
# reproduces, and A1111 has no TCD: documented limitations, like DDPM (docs/infotext.md)
A1111_OWN_GRID = {"lcm", "tcd", "ddpm"}
# A1111 >= 1.9 modules/sd_samplers_kdiffusion.py: options["scheduler"] of each sampler, restated;
# "Automatic" (or no Schedule type) means this, and "uniform" (k-diffusion's get_sigmas) for the
# k-diffusion samplers not listed; DDIM and UniPC (sd_samplers_timesteps.py) run on A1111's own
# timesteps whatever the type ("default": diffusers' leading spacing on SD configs)
A1111_AUTOMATIC = {"DPM++ 2M": "karras", "DPM++ 2M SDE": "exponential",
                   "DPM++ 3M SDE": "exponential",
                   "DDIM": "default", "UniPC": "default"}  # fmt: skip
# A1111's sampler labels ldm shares (sd_samplers_kdiffusion.py, sd_samplers_timesteps.py); an
# unknown "Sampler" renders as A1111's first sampler, DPM++ 2M (sd_samplers.py)
A1111_SAMPLERS = {"Euler a", "Euler", "LMS", "Heun", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 3M SDE",
                  "DDIM", "UniPC"}  # fmt: skip
A1111_TYPES = {"Uniform": "uniform", "Karras": "karras", "Exponential": "exponential",
               "SGM Uniform": "sgm_uniform", "Simple": "simple", "Beta": "beta"}  # fmt: skip


def test_functions_and_names():
    assert list(SAMPLERS) == [s.name for s in SPECS] and len(SPECS) == 13
    owners: dict[str, set[str]] = {}  # spelling -> samplers it names
    for spec in SPECS:
        base = SPEC[PRESETS.get(spec.name, spec.name)]
        assert spec.function.__name__ == f"sample_{base.name}" and callable(spec.function)
        names = [spec.name, *spec.aliases, *(n for n, _ in spec.named_schedules)]
        names += [spec.a1111] if base is spec else []
        assert spec.a1111 == base.a1111  # a preset writes its base's label, which reads as it
        for n in names:
            owners.setdefault(" ".join(n.lower().split()), set()).add(spec.name)
        for name in names:
            assert resolve_sampler(name)[0] == spec.name and sampler_spec(name) is spec
            assert resolve_sampler(f"  {name.upper()} ")[0] == spec.name
        for name, schedule in spec.named_schedules:
            assert resolve_sampler(name) == (spec.name, schedule) and schedule in SIGMA_SCHEDULES
        assert spec.a1111_schedule in SIGMA_SCHEDULES
        assert spec.spacing in (*TIMESTEP_SPACINGS, "lcm")
        assert set(dict(spec.defaults)) <= {"steps", "guidance_scale", "schedule"}
    assert all(len(o) == 1 for o in owners.values()), "a name means two samplers"
    with pytest.raises(LdmError, match="valid: ddim, ddpm"):
        sampler_spec("nope")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_eta_and_noise_match_the_function(spec):
    eta = inspect.signature(spec.function).parameters.get("eta")
    assert spec.eta == (None if eta is None else eta.default)
    x, sigmas = torch.ones(2, 1, 2, 2), torch.tensor([2.0, 1.0, 0.5, 0.0])
    calls = []
    noise = make_noise([torch.Generator().manual_seed(i) for i in range(2)], (1, 2, 2))

    def counting():
        calls.append(1)
        return noise()

    maps = dict(sigma_to_t=lambda s: s * 100, t_to_sigma=lambda t: t / 100)
    spec.function(lambda x, s: 0.5 * x, x, sigmas, noise=counting,
                  **(maps if spec.timestep_maps else {}))  # fmt: skip
    assert bool(calls) == spec.stochastic


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_timestep_facts_match_diffusers(spec):
    cls = getattr(diffusers, DIFFUSERS_CLASS[spec.name])
    spacing = inspect.signature(cls.__init__).parameters["timestep_spacing"].default
    # LCM/TCD ignore timestep_spacing ("lcm": their own grid); Turbo is run with "trailing"
    assert spec.spacing == {"lcm": "lcm", "tcd": "lcm", "turbo": "trailing"}.get(spec.name, spacing)
    assert spec.multistep == ("Multistep" in cls.__name__)
    # Euler-family schedulers keep k-space latents: their init_noise_sigma is sigma_max
    scheduler = cls(timestep_spacing="linspace")
    assert spec.k_space == (float(scheduler.init_noise_sigma) > 1.0)


def test_options():
    sd1 = NoiseSchedule.from_scheduler_config(dict(set_alpha_to_one=False))
    assert sampler_spec("ddim").options(sd1) == {"final_sigma": sd1.final_sigma, "eta": 0.0}
    assert sampler_spec("Euler a").options(sd1, 0.3) == {"eta": 0.3}
    assert sampler_spec("euler").options(sd1, 0.3) == {}
    assert check_sampler("DPM++ 2M Karras", "default")[1] == "karras"
    assert check_sampler("DPM++ 2M Karras", "beta")[1] == "beta"  # an explicit flag wins
    with pytest.raises(LdmError, match="--schedule"):
        check_sampler("euler", "nope")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("schedule", SIGMA_SCHEDULES)
def test_a1111_label_round_trips(spec, schedule):
    eta = {} if spec.eta is None else {"eta": 0.25}
    params = {**BASE, "sampler": spec.name, "schedule": schedule, **eta}
    text = format_infotext(params)
    # ours reads back what we wrote (a preset as the sampler it presets: the same image)
    assert parse_infotext(text) == {**params, "sampler": PRESETS.get(spec.name, spec.name)}
    got = a1111_parse(text)
    assert got["Sampler"] == spec.a1111
    if spec.name in A1111_OWN_GRID:
        return
    # what A1111 renders from our text is what ldm rendered; ldm's "default" (diffusers'
    # spacing) where A1111 has no such schedule: the nearest one, marked as diffusers' spacing
    kind = got.get("Schedule type", "Automatic")
    renders = (
        A1111_AUTOMATIC.get(spec.a1111, "uniform") if kind == "Automatic" else A1111_TYPES[kind]
    )
    if A1111_AUTOMATIC.get(spec.a1111) == "default":  # A1111's DDIM/UniPC ignore the type
        assert (kind == "Automatic") == (schedule == "default")
        return  # ldm's other schedules for them: the documented limitation (docs/infotext.md)
    marked = got.get("Schedule spacing") == "diffusers"
    assert marked == (schedule == "default" and renders != "default")
    assert renders == (spec.a1111_nearest if marked else schedule)
    assert (kind == "Automatic") == (schedule == A1111_AUTOMATIC.get(spec.a1111, "uniform"))
    if spec.eta is not None:
        assert got[spec.a1111_eta] == "0.25"
    # an A1111 text saying "Automatic" reads as what A1111 renders for the sampler
    automatic = text.replace(f"Schedule type: {kind}", "Schedule type: Automatic")
    automatic = automatic.replace("Schedule spacing: diffusers, ", "")
    assert parse_infotext(automatic)["schedule"] == A1111_AUTOMATIC.get(spec.a1111, "uniform")
