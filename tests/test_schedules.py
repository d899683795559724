"""Training betas and sigma schedules against diffusers' schedulers (the independent route)."""

import numpy as np
import pytest
import torch

from ldm.errors import ConfigError, LdmError
from ldm.sampling.schedules import (
    SIGMA_SCHEDULES,
    NoiseSchedule,
    get_sigmas,
    init_noise_scale,
)

SD1 = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    set_alpha_to_one=False,
    prediction_type="epsilon",
)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_equal_diffusers(beta_schedule, zero_snr):
    from diffusers import DDPMScheduler

    config = dict(SD1, beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr)
    want = DDPMScheduler.from_config(config)
    ours = NoiseSchedule.from_scheduler_config(config)
    torch.testing.assert_close(ours.betas, want.betas, rtol=0, atol=1e-7)
    n = -1 if zero_snr else None  # we floor abar[-1] at 2**-24 like diffusers' Euler
    torch.testing.assert_close(ours.alphas_cumprod[:n], want.alphas_cumprod[:n], rtol=1e-6, atol=0)
    if zero_snr:
        assert want.alphas_cumprod[-1] < 1e-12 and ours.alphas_cumprod[-1] == 2**-24


def test_trained_betas_and_overrides():
    betas = np.linspace(1e-4, 2e-2, 50).tolist()
    s = NoiseSchedule.from_scheduler_config(
        dict(SD1, trained_betas=betas), prediction_type="v_prediction"
    )
    assert s.num_train_timesteps == 50 and s.prediction_type == "v_prediction"
    with pytest.raises(ConfigError, match="prediction_type"):
        NoiseSchedule.from_scheduler_config(dict(SD1, prediction_type="x0"))
    with pytest.raises(ConfigError, match="unknown scheduler override"):
        NoiseSchedule.from_scheduler_config(SD1, beta_strat=0.1)
    with pytest.raises(ConfigError, match="beta_schedule"):
        NoiseSchedule.from_scheduler_config(dict(SD1, beta_schedule="cosine"))


def _diffusers_sigmas(cls_name: str, config: dict, steps: int) -> torch.Tensor:
    import diffusers

    scheduler = getattr(diffusers, cls_name).from_config(config)
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "sigmas") and cls_name != "DDIMScheduler":
        sigmas = scheduler.sigmas
        if cls_name == "HeunDiscreteScheduler":  # Heun repeats interior sigmas for its 2 stages
            sigmas = torch.cat([sigmas[:1], sigmas[1::2]])
        return sigmas.float()
    table = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5
    return torch.cat([table[scheduler.timesteps], torch.zeros(1)]).float()


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing", None])
@pytest.mark.parametrize(
    "sampler,cls_name",
    [
        ("ddim", "DDIMScheduler"),
        ("euler", "EulerDiscreteScheduler"),
        ("heun", "HeunDiscreteScheduler"),
        ("lms", "LMSDiscreteScheduler"),
        ("dpmpp_2m", "DPMSolverMultistepScheduler"),
        ("unipc", "UniPCMultistepScheduler"),
    ],
)
def test_default_sigmas_equal_diffusers(spacing, sampler, cls_name):
    config = dict(SD1) if spacing is None else dict(SD1, timestep_spacing=spacing)
    for steps in (7, 20):
        want = _diffusers_sigmas(cls_name, config, steps)
        got = get_sigmas("default", steps, NoiseSchedule.from_scheduler_config(config), sampler)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "name,flag",
    [
        ("karras", "use_karras_sigmas"),
        ("exponential", "use_exponential_sigmas"),
        ("beta", "use_beta_sigmas"),
    ],
)
def test_named_schedules_equal_dpm_solver(name, flag):
    want = _diffusers_sigmas("DPMSolverMultistepScheduler", dict(SD1, **{flag: True}), 12)
    got = get_sigmas(name, 12, NoiseSchedule.from_scheduler_config(SD1), "dpmpp_2m")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_simple_is_trailing_spacing():
    want = _diffusers_sigmas("EulerDiscreteScheduler", dict(SD1, timestep_spacing="trailing"), 9)
    got = get_sigmas("simple", 9, NoiseSchedule.from_scheduler_config(SD1))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", SIGMA_SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 25])
def test_every_schedule_descends_to_exactly_one_zero(name, steps):
    schedule = NoiseSchedule.from_scheduler_config(SD1)
    sigmas = get_sigmas(name, steps, schedule, "euler")
    assert sigmas.shape == (steps + 1,) and sigmas.dtype == torch.float32
    assert (sigmas == 0).sum() == 1 and sigmas[-1] == 0
    assert (sigmas[:-1] > sigmas[1:]).all()
    assert sigmas[0] <= schedule.sigma_max * (1 + 1e-6)


def test_unknown_schedule_and_bad_steps():
    schedule = NoiseSchedule.from_scheduler_config(SD1)
    with pytest.raises(LdmError, match="valid: default, uniform, karras, exponential"):
        get_sigmas("karas", 10, schedule)
    with pytest.raises(LdmError, match="at least 1"):
        get_sigmas("karras", 0, schedule)


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_init_noise_scale_equals_diffusers(spacing):
    import diffusers

    config = dict(SD1, timestep_spacing=spacing)
    schedule = NoiseSchedule.from_scheduler_config(config)
    for sampler, cls_name in [
        ("euler", "EulerDiscreteScheduler"),
        ("ddim", "DDIMScheduler"),
        ("dpmpp_2m", "DPMSolverMultistepScheduler"),
    ]:
        scheduler = getattr(diffusers, cls_name).from_config(config)
        scheduler.set_timesteps(10)
        sigmas = get_sigmas("default", 10, schedule, sampler)
        # diffusers' VP schedulers start at unit noise, which is sqrt(sigma_0^2 + 1) in k-space
        vp = cls_name != "EulerDiscreteScheduler"
        want = float(scheduler.init_noise_sigma) * ((float(sigmas[0]) ** 2 + 1) ** 0.5 if vp else 1)
        assert init_noise_scale(sigmas, schedule, sampler) == pytest.approx(want, rel=1e-6)
