"""Samplers: parity with diffusers' loops and k-diffusion, Gaussian statistics, identities."""

import pytest
import torch

from ldm.denoiser import Denoiser
from ldm.errors import LdmError
from ldm.guidance import cfg
from ldm.sampling.noise import make_noise
from ldm.sampling.samplers import SAMPLERS, SPEC, resolve_sampler, sampler_options
from ldm.sampling.schedules import NoiseSchedule, get_sigmas, init_noise_scale, timestep_interp
from ldm.text.cond import Cond

SD1 = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    prediction_type="epsilon",
    skip_prk_steps=True,
    timestep_spacing="leading",
)
SD2 = dict(SD1, prediction_type="v_prediction")
SHAPE = (4, 6, 6)


class ToyNet(torch.nn.Module):
    """A fixed, deterministic, smooth 'U-Net': output depends on x, t and the context."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.nn.Parameter(torch.randn(4, 4, generator=g) * 0.5)
        self.proj = torch.nn.Parameter(torch.randn(8, 4, generator=g) * 0.3)

    def forward(self, x, t, encoder_hidden_states, encoder_attention_mask=None):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1) / 1000
        ctx = (encoder_hidden_states.mean(1) @ self.proj)[:, :, None, None]  # (B, 4, 1, 1)
        h = torch.einsum("oc,bchw->bohw", self.mix, x) + x.roll(1, dims=-1) * 0.3
        return torch.tanh(h + 2 * t - 1 + ctx) + 0.5 * x * t


def conds(batch: int = 2):
    g = torch.Generator().manual_seed(7)
    return Cond(torch.randn(batch, 5, 8, generator=g)), Cond(torch.randn(batch, 5, 8, generator=g))


def diffusers_loop(scheduler, net, cond, uncond, noise, steps, scale, rescale, generators):
    """StableDiffusionPipeline's denoising loop, verbatim in structure."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    context = torch.cat([uncond.context, cond.context])
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        out_u, out_c = net(inp, t, context).chunk(2)
        pred = out_u + scale * (out_c - out_u)
        if rescale > 0:
            pred = rescale_noise_cfg(pred, out_c, guidance_rescale=rescale)
        kwargs = (
            {"generator": generators} if "generator" in scheduler.step.__code__.co_varnames else {}
        )
        latents = scheduler.step(pred, t, latents, **kwargs).prev_sample
    return latents


def ldm_loop(
    sampler, schedule_name, config, net, cond, uncond, steps, scale, rescale, seeds, **extra_options
):
    schedule = NoiseSchedule.from_scheduler_config(config)
    sigmas = get_sigmas(schedule_name, steps, schedule, sampler=sampler)
    denoiser = Denoiser(net, schedule, interpolation=timestep_interp(sampler, schedule_name))
    noise = make_noise([torch.Generator().manual_seed(s) for s in seeds], SHAPE)
    x = noise() * init_noise_scale(sigmas, schedule, sampler)
    guided = cfg(denoiser, cond, uncond, scale, rescale)
    options = {**sampler_options(sampler, schedule), **extra_options}
    return SAMPLERS[sampler](guided, x, sigmas, noise=noise, **options)


CASES = [  # (our sampler, schedule, diffusers class, extra config)
    ("ddim", "default", "DDIMScheduler", {}),
    ("euler", "default", "EulerDiscreteScheduler", {}),
    ("euler_ancestral", "default", "EulerAncestralDiscreteScheduler", {}),
    ("heun", "default", "HeunDiscreteScheduler", {}),
    ("lms", "default", "LMSDiscreteScheduler", {}),
    ("dpmpp_2m", "default", "DPMSolverMultistepScheduler", {}),
    ("dpmpp_2m", "karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("unipc", "default", "UniPCMultistepScheduler", {}),
    ("ddpm", "default", "DDPMScheduler", {}),
    ("unipc", "default", "UniPCMultistepScheduler", {"solver_order": 3}),
    (
        "dpmpp_2m_sde",
        "karras",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
]


@pytest.mark.parametrize("config_name", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler,schedule_name,cls_name,extra", CASES)
def test_parity_with_diffusers_scheduler(config_name, sampler, schedule_name, cls_name, extra):
    import diffusers

    config = SD1 if config_name == "sd1" else SD2
    rescale = 0.0 if config_name == "sd1" else 0.7
    net, (cond, uncond), seeds, steps = ToyNet(), conds(), [11, 12], 12
    scheduler = getattr(diffusers, cls_name).from_config({**config, **extra})
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise = torch.cat([torch.randn((1, *SHAPE), generator=g) for g in gens])
    with torch.no_grad():
        want = diffusers_loop(scheduler, net, cond, uncond, noise, steps, 7.5, rescale, gens)
        options = {"order": extra["solver_order"]} if "solver_order" in extra else {}
        got = ldm_loop(
            sampler, schedule_name, config, net, cond, uncond, steps, 7.5, rescale, seeds, **options
        )
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, f"{sampler}/{schedule_name} vs {cls_name}: relative error {err:.2e}"


def test_parity_linspace_spacing_fractional_timesteps():
    """A config without timestep_spacing: Euler uses fractional timesteps, DPM-Solver rounds."""
    import diffusers

    config = {k: v for k, v in SD1.items() if k != "timestep_spacing"}
    net, (cond, uncond) = ToyNet(1), conds()
    for sampler, cls_name in [
        ("euler", "EulerDiscreteScheduler"),
        ("dpmpp_2m", "DPMSolverMultistepScheduler"),
    ]:
        scheduler = getattr(diffusers, cls_name).from_config(config)
        noise = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = diffusers_loop(scheduler, net, cond, uncond, noise, 9, 5.0, 0.0, None)
            schedule = NoiseSchedule.from_scheduler_config(config)
            sigmas = get_sigmas("default", 9, schedule, sampler=sampler)
            den = Denoiser(net, schedule, interpolation=timestep_interp(sampler, "default"))
            x = noise * init_noise_scale(sigmas, schedule, sampler)
            got = SAMPLERS[sampler](cfg(den, cond, uncond, 5.0), x, sigmas)
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4, sampler


def toy_denoiser(x, sigma):
    """A smooth nonlinear denoiser (no network) for sampler-vs-sampler comparisons."""
    s = sigma.reshape(-1, 1, 1, 1)
    return torch.tanh(x / (s**2 + 1) ** 0.5) * 0.8 + 0.1 * x.roll(1, dims=-1) / (s + 1)


KDIFF = ["euler", "euler_ancestral", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"]


@pytest.mark.parametrize("name", KDIFF)
def test_equals_k_diffusion(name):
    import k_diffusion.sampling as ks

    sigmas = ks.get_sigmas_karras(10, 0.03, 14.6)
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(3)) * sigmas[0]
    kd_fn = getattr(ks, f"sample_{name}")
    kwargs = {}
    ours_noise = None
    if name in ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"):
        kd_noise = make_noise(
            [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)], SHAPE
        )
        kwargs["noise_sampler"] = lambda s, sn: kd_noise()
        ours_noise = make_noise(
            [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)], SHAPE
        )
    want = kd_fn(toy_denoiser, x, sigmas, disable=True, **kwargs)
    got = SAMPLERS[name](toy_denoiser, x, sigmas, noise=ours_noise)
    assert (got - want).abs().max().item() <= 1e-5


# samplers over any denoiser (LCM and TCD need a model's timestep maps: tests/test_few_step.py)
ANY_DENOISER = [name for name in SAMPLERS if not SPEC[name].timestep_maps]


@pytest.mark.parametrize("name", ANY_DENOISER)
def test_gaussian_data_statistics(name):
    """Data ~ N(mu, s^2) has the exact denoiser D = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)."""
    mu, s = 0.7, 0.5
    schedule = NoiseSchedule.from_scheduler_config(SD1)

    def denoise(x, sigma):
        sig2 = sigma.reshape(-1, 1, 1, 1) ** 2
        return (s**2 * x + sig2 * mu) / (s**2 + sig2)

    sigmas = get_sigmas("karras", 100, schedule, sampler=name)
    n = 4000
    noise = make_noise([torch.Generator().manual_seed(100)], (n,))  # one generator, many values

    def batch_noise():
        return noise().reshape(1, 1, 1, n)

    x = batch_noise() * (sigmas[0] ** 2 + s**2) ** 0.5  # exact marginal at sigma_max
    out = SAMPLERS[name](denoise, x, sigmas, noise=batch_noise)
    assert abs(out.mean().item() - mu) < 0.03, out.mean().item()
    assert abs(out.std().item() - s) < 0.03, out.std().item()


def test_ddim_eta0_equals_euler():
    schedule = NoiseSchedule.from_scheduler_config(SD1)
    sigmas = get_sigmas("default", 15, schedule, sampler="ddim")
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(0)) * sigmas[0]
    a = SAMPLERS["ddim"](toy_denoiser, x, sigmas, eta=0.0)
    b = SAMPLERS["euler"](toy_denoiser, x, sigmas)
    assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ANY_DENOISER)
def test_batch_of_three_equals_three_single_runs(name):
    schedule = NoiseSchedule.from_scheduler_config(SD1)
    sigmas = get_sigmas("karras", 8, schedule, sampler=name)
    seeds = [3, 4, 5]
    options = {"eta": 0.7} if name == "ddim" else {}

    def run(seed_list):
        noise = make_noise([torch.Generator().manual_seed(s) for s in seed_list], SHAPE)
        x = noise() * sigmas[0]
        return SAMPLERS[name](toy_denoiser, x, sigmas, noise=noise, **options)

    batch = run(seeds)
    singles = torch.cat([run([s]) for s in seeds])
    assert (batch - singles).abs().max().item() <= 1e-4


def test_stochastic_samplers_never_touch_global_rng():
    schedule = NoiseSchedule.from_scheduler_config(SD1)
    sigmas = get_sigmas("karras", 5, schedule)
    for name in ["euler_ancestral", "ddpm", "dpmpp_2m_sde", "dpmpp_3m_sde"]:
        noise = make_noise([torch.Generator().manual_seed(1)], SHAPE)
        x = noise() * sigmas[0]
        torch.manual_seed(0)
        before = torch.random.get_rng_state()
        SAMPLERS[name](toy_denoiser, x, sigmas, noise=noise)
        assert torch.equal(before, torch.random.get_rng_state()), name
        with pytest.raises(ValueError):
            SAMPLERS[name](toy_denoiser, x, sigmas)


def test_callback_sees_every_step():
    sigmas = get_sigmas("karras", 6, NoiseSchedule.from_scheduler_config(SD1))
    seen = []
    SAMPLERS["heun"](
        toy_denoiser,
        torch.zeros(1, *SHAPE),
        sigmas,
        callback=lambda i, n, x, d: seen.append((i, n)),
    )
    assert seen == [(i, 6) for i in range(6)]


def test_resolve_sampler_names():
    assert resolve_sampler("Euler a") == ("euler_ancestral", None)
    assert resolve_sampler("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert resolve_sampler("dpm++ 2m sde karras") == ("dpmpp_2m_sde", "karras")
    assert resolve_sampler("DPM++ 3M SDE") == ("dpmpp_3m_sde", None)
    assert resolve_sampler("UniPC") == ("unipc", None)
    assert resolve_sampler("dpmpp_2m") == ("dpmpp_2m", None)
    for display in ["Euler", "DPM++ 2M", "DPM++ 2M SDE", "DDIM", "LMS", "Heun", "DDPM"]:
        assert resolve_sampler(display)[0] in SAMPLERS
    with pytest.raises(LdmError, match="valid: ddim, ddpm, euler"):
        resolve_sampler("Euler b")
