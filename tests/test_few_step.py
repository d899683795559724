"""Few-step samplers (LCM, TCD, Turbo): timesteps and whole sampling loops against diffusers'
LCMScheduler, TCDScheduler and trailing Euler a, and the consistency boundary conditions."""

import numpy as np
import pytest
import torch

from ldm.denoiser import Denoiser
from ldm.errors import LdmError
from ldm.guidance import cfg
from ldm.sampling.consistency import boundary_scalings, consistency_denoised
from ldm.sampling.noise import make_noise
from ldm.sampling.samplers import SPEC, resolve_sampler, sampler_options
from ldm.sampling.schedules import (
    NoiseSchedule,
    default_timesteps,
    get_sigmas,
    init_noise_scale,
    timestep_interp,
)
from tests.test_samplers import SD1, SHAPE, ToyNet, conds, diffusers_loop

LCM_CONFIG = dict(SD1, timestep_spacing="leading", original_inference_steps=50)


@pytest.mark.parametrize("cls_name,sampler", [("LCMScheduler", "lcm"), ("TCDScheduler", "tcd")])
@pytest.mark.parametrize("original", [50, 25])
def test_timesteps_equal_diffusers(cls_name, sampler, original):
    import diffusers

    config = dict(LCM_CONFIG, original_inference_steps=original)
    scheduler = getattr(diffusers, cls_name).from_config(config)
    schedule = NoiseSchedule.from_scheduler_config(config)
    for n in (1, 2, 3, 4, 6, 8, original):
        scheduler.set_timesteps(n)
        want = scheduler.timesteps.numpy()
        np.testing.assert_array_equal(default_timesteps(n, schedule, sampler), want)
        sigmas = get_sigmas("default", n, schedule, sampler=sampler)
        table = schedule.sigmas[torch.from_numpy(want.copy())]
        torch.testing.assert_close(sigmas[:-1], table, rtol=1e-6, atol=0)


def test_more_steps_than_the_distillation_grid_is_an_error():
    schedule = NoiseSchedule.from_scheduler_config(LCM_CONFIG)
    with pytest.raises(LdmError, match="exceeds the 50 timesteps"):
        get_sigmas("default", 51, schedule, sampler="lcm")


def test_boundary_conditions_closed_form():
    """c_skip(0) = 1, c_out(0) = 0 (f is the identity at the data end) and c_skip^2 + c_out^2
    ... the LCM form: c_skip = sd^2 / (s^2 + sd^2), c_out = s / sqrt(s^2 + sd^2), s = 10 t."""
    t = torch.tensor([0.0, 1.0, 19.0, 999.0])
    c_skip, c_out = boundary_scalings(t)
    s = 10 * t.double()
    torch.testing.assert_close(c_skip, 0.25 / (s**2 + 0.25))
    torch.testing.assert_close(c_out, s / (s**2 + 0.25) ** 0.5)
    assert c_skip[0] == 1 and c_out[0] == 0
    x, denoised = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    sigma = torch.tensor([0.0, 0.1, 1.0, 14.6])
    f = consistency_denoised(x, sigma, t, denoised)
    torch.testing.assert_close(f[0], x[0])  # t = 0: the identity
    x_vp = x[3] / (1 + 14.6**2) ** 0.5
    torch.testing.assert_close(f[3], (c_skip[3] * x_vp + c_out[3] * denoised[3]).float())


def ldm_loop(sampler, schedule_name, config, net, cond, uncond, steps, scale, seeds, **opts):
    """The pipeline's sampling path: sigmas, denoiser, CFG, the table's options and maps."""
    schedule = NoiseSchedule.from_scheduler_config(config)
    sigmas = get_sigmas(schedule_name, steps, schedule, sampler=sampler)
    denoiser = Denoiser(net, schedule, interpolation=timestep_interp(sampler, schedule_name))
    noise = make_noise([torch.Generator().manual_seed(s) for s in seeds], SHAPE)
    x = noise() * init_noise_scale(sigmas, schedule, sampler, schedule_name)
    options = {**sampler_options(sampler, schedule), **opts}
    if SPEC[sampler].timestep_maps:
        options.update(sigma_to_t=denoiser.sigma_to_t, t_to_sigma=denoiser.t_to_sigma)
    guided = cfg(denoiser, cond, uncond, scale)
    return SPEC[sampler].function(guided, x, sigmas, noise=noise, **options)


CASES = [  # (sampler, schedule, diffusers class, extra config, extra ldm options)
    ("lcm", "default", "LCMScheduler", {}, {}),
    ("tcd", "default", "TCDScheduler", {}, {}),
    ("tcd", "default", "TCDScheduler", {}, {"eta": 0.0}),
    ("tcd", "default", "TCDScheduler", {}, {"eta": 0.7}),
    ("turbo", "simple", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, {}),
]


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("sampler,schedule_name,cls_name,extra,opts", CASES)
def test_loop_equals_diffusers(sampler, schedule_name, cls_name, extra, opts, steps):
    import diffusers

    config = {**LCM_CONFIG, **extra}
    scheduler = getattr(diffusers, cls_name).from_config(config)
    if "eta" in opts:  # TCD's gamma is an argument of its step()
        step = scheduler.step

        def step_with_eta(model_output, timestep, sample, generator=None):
            return step(model_output, timestep, sample, eta=opts["eta"], generator=generator)

        scheduler.step = step_with_eta
    net, (cond, uncond), seeds = ToyNet(), conds(), [3, 4]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise = torch.cat([torch.randn((1, *SHAPE), generator=g) for g in gens])
    with torch.no_grad():
        want = diffusers_loop(scheduler, net, cond, uncond, noise, steps, 2.5, 0.0, gens)
        got = ldm_loop(sampler, schedule_name, config, net, cond, uncond, steps, 2.5, seeds, **opts)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, f"{sampler} x {steps} vs {cls_name}: relative error {err:.2e}"


def test_turbo_reads_back_as_euler_a_and_brings_its_defaults():
    assert resolve_sampler("Euler a") == ("euler_ancestral", None)
    assert resolve_sampler("turbo") == ("turbo", None)
    assert resolve_sampler("LCM") == ("lcm", None)
    assert dict(SPEC["turbo"].defaults) == {"steps": 1, "guidance_scale": 1.0, "schedule": "simple"}
    assert dict(SPEC["lcm"].defaults)["steps"] == 4


@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
def test_image_depends_on_its_seed_not_its_batch(sampler):
    net, (cond, uncond) = ToyNet(), conds(3)
    with torch.no_grad():
        batch = ldm_loop(sampler, "default", LCM_CONFIG, net, cond, uncond, 4, 1.0, [5, 6, 7])
        singles = [
            ldm_loop(sampler, "default", LCM_CONFIG, net, cond[i : i + 1], None, 4, 1.0, [s])
            for i, s in enumerate([5, 6, 7])
        ]
    torch.testing.assert_close(batch, torch.cat(singles), rtol=1e-5, atol=1e-5)
