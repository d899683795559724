"""Samplers on a flow (velocity) model: diffusers' FlowMatch loops, ComfyUI's flow forms, and
the exact flow of Gaussian data."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from test_samplers import ToyNet, conds

from ldm.denoiser import Denoiser
from ldm.guidance import cfg
from ldm.sampling.flow import flow_mu, flow_sigmas
from ldm.sampling.multistep import (
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_unipc,
)
from ldm.sampling.noise import make_noise
from ldm.sampling.singlestep import sample_euler, sample_euler_ancestral, sample_heun, sample_lms

SD3 = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX = dict(SD3, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
SHAPE = (2, 4, 6, 6)


def _diffusers_loop(scheduler, net, cond, uncond, latents, scale):
    """StableDiffusion3Pipeline's denoising loop: guidance on the velocity, then step."""
    context = torch.cat([uncond.context, cond.context])
    for t in scheduler.timesteps:
        if scale > 1:
            v_u, v_c = net(torch.cat([latents] * 2), t.expand(2 * len(latents)), context).chunk(2)
            v = v_u + scale * (v_c - v_u)
        else:
            v = net(latents, t.expand(len(latents)), cond.context)
        latents = scheduler.step(v, t, latents).prev_sample
    return latents


def _start():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
@pytest.mark.parametrize("scale", [1.0, 4.5])
@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("config", ["sd3", "flux"])
def test_euler_equals_flow_match_euler(config, steps, scale):
    """FlowMatch pipelines start from plain noise (sigma_0 = 1): x = noise, no scaling."""
    config, seq = (SD3, None) if config == "sd3" else (FLUX, 1024)
    net, (cond, uncond) = ToyNet(), conds(2)
    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(steps, mu=None if seq is None else flow_mu(config, seq))
    want = _diffusers_loop(ref, net, cond, uncond, _start(), scale)
    sigmas = flow_sigmas("default", steps, config, image_seq_len=seq)
    assert sigmas[0] == 1.0
    guided = cfg(Denoiser(net, None, prediction="flow"), cond, uncond, scale)
    got = sample_euler(guided, _start() * sigmas[0], sigmas)
    # D = x - sigma v and (x - D) / sigma round differently from diffusers' x + dt v: float32
    # rounding apart, not bitwise
    assert (got - want).abs().max().item() <= 1e-6 * want.abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("steps", [2, 10])
def test_heun_equals_flow_match_heun(steps):
    net, (cond, uncond) = ToyNet(), conds(2)
    ref = FlowMatchHeunDiscreteScheduler.from_config(SD3)
    ref.set_timesteps(steps)
    want = _diffusers_loop(ref, net, cond, uncond, _start(), 3.0)
    guided = cfg(Denoiser(net, None, prediction="flow"), cond, uncond, 3.0)
    sigmas = flow_sigmas("default", steps, SD3)
    got = sample_heun(guided, _start(), sigmas)
    # the corrector's (x - D) / sigma_next magnifies float32 rounding by 1 / sigma_next
    bound = 1e-6 * want.abs().max().item() / sigmas[-2].item()
    assert (got - want).abs().max().item() <= bound


# --- ComfyUI's flow forms, written out from comfy/k_diffusion/sampling.py --------------------


def _comfy_lambda(sigma):  # sigma_to_half_log_snr for CONST (flow) models
    return sigma.logit().neg()


def comfy_euler_ancestral_rf(model, x, sigmas, noise, eta=1.0, s_noise=1.0):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]))
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        downstep_ratio = 1 + (sigmas[i + 1] / sigmas[i] - 1) * eta
        sigma_down = sigmas[i + 1] * downstep_ratio
        alpha_ip1, alpha_down = 1 - sigmas[i + 1], 1 - sigma_down
        renoise = (sigmas[i + 1] ** 2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
        ratio = sigma_down / sigmas[i]
        x = ratio * x + (1 - ratio) * denoised
        if eta > 0:
            x = (alpha_ip1 / alpha_down) * x + noise() * s_noise * renoise
    return x


def comfy_dpmpp_sde_m(model, x, sigmas, noise, eta=1.0, s_noise=1.0, order=2, solver="midpoint"):
    """sample_dpmpp_2m_sde (order 2) and sample_dpmpp_3m_sde (order 3) for a flow model."""
    d_1 = d_2 = h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = _comfy_lambda(sigmas[i]), _comfy_lambda(sigmas[i + 1])
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lam_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x
            x = x + alpha_t * (-h_eta).expm1().neg() * denoised
            if order == 2 and d_1 is not None:
                r = h_1 / h
                phi = (-h_eta).expm1().neg()
                if solver == "heun":
                    x = x + alpha_t * (phi / (-h_eta) + 1) * (1 / r) * (denoised - d_1)
                else:
                    x = x + 0.5 * alpha_t * phi * (1 / r) * (denoised - d_1)
            elif order == 3 and h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif order == 3 and h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * (denoised - d_1) / (h_1 / h)
            if eta > 0 and s_noise > 0:
                x = x + noise() * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        d_1, d_2, h_1, h_2 = denoised, d_1, h, h_1
    return x


def _toy_flow_denoiser():
    net, (cond, _) = ToyNet(), conds(2)
    denoiser = Denoiser(net, None, prediction="flow")
    return lambda x, sigma: denoiser(x, sigma, cond)


def _noise_list(count: int = 64):
    """The same fresh noise, draw by draw, for both implementations."""
    draws = [
        torch.randn(SHAPE, generator=torch.Generator().manual_seed(50 + i)) for i in range(count)
    ]
    it = iter(draws)
    return lambda: next(it)


def _comfy_first_sigma(sigmas, shift=3.0):
    """offset_first_sigma_for_snr: sigma 1 becomes percent_to_sigma(1e-4) = shift(1 - 1e-4)."""
    t = 1 - 1e-4
    return torch.cat([torch.tensor([shift * t / (1 + (shift - 1) * t)]), sigmas[1:]])


COMFY_CASES = [  # (ldm function, options, ComfyUI form, its options)
    (sample_euler_ancestral, {}, comfy_euler_ancestral_rf, {}),
    (sample_euler_ancestral, {"eta": 0.5}, comfy_euler_ancestral_rf, {"eta": 0.5}),
    (sample_dpmpp_2m_sde, {}, comfy_dpmpp_sde_m, {}),
    (sample_dpmpp_2m_sde, {"eta": 0.0}, comfy_dpmpp_sde_m, {"eta": 0.0}),
    (sample_dpmpp_2m_sde, {"solver_type": "heun"}, comfy_dpmpp_sde_m, {"solver": "heun"}),
    (sample_dpmpp_3m_sde, {}, comfy_dpmpp_sde_m, {"order": 3}),
    (
        sample_dpmpp_3m_sde,
        {"eta": 0.5, "s_noise": 0.8},
        comfy_dpmpp_sde_m,
        {"order": 3, "eta": 0.5, "s_noise": 0.8},
    ),
]


@torch.no_grad()
@pytest.mark.parametrize("fn,options,comfy,comfy_options", COMFY_CASES)
def test_flow_forms_equal_comfyui(fn, options, comfy, comfy_options):
    """Same sigmas (ComfyUI's SDE samplers move sigma 1 to just below it), same noise draws."""
    denoise = _toy_flow_denoiser()
    sigmas = flow_sigmas("simple", 8, SD3).double()
    if comfy is comfy_dpmpp_sde_m:
        sigmas = _comfy_first_sigma(sigmas)
    want = comfy(denoise, _start(), sigmas.float(), _noise_list(), **comfy_options)
    got = fn(denoise, _start(), sigmas.float(), noise=_noise_list(), flow=True, **options)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("fn", [sample_dpmpp_2m_sde, sample_dpmpp_3m_sde])
def test_sde_forms_from_pure_noise(fn, eta):
    """At sigma = 1 (lambda = -inf) the step takes its limit: x' = (1 - s') D + s' n (eta 1),
    the Euler step s' x + (1 - s') D (eta 0); ComfyUI's offset start lands next to it."""
    denoise = _toy_flow_denoiser()
    x, s1 = _start(), 0.6
    draws = _noise_list()
    got = fn(denoise, x, torch.tensor([1.0, s1, 0.0]), noise=draws, eta=eta, flow=True)
    d0 = denoise(x, torch.ones(2))
    first_noise = _noise_list()()
    x1 = (1 - s1) * d0 + (s1 * first_noise if eta else s1 * x)
    torch.testing.assert_close(got, denoise(x1, torch.full((2,), s1)), atol=1e-5, rtol=1e-5)
    sigmas = flow_sigmas("simple", 8, SD3)
    ours = fn(denoise, _start(), sigmas, noise=_noise_list(), eta=eta, flow=True)
    comfy = fn(
        denoise, _start(), _comfy_first_sigma(sigmas), noise=_noise_list(), eta=eta, flow=True
    )
    assert torch.isfinite(ours).all()
    assert (ours - comfy).abs().max().item() < 1e-2 * comfy.abs().max().item()


# --- Gaussian data: the exact flow denoiser --------------------------------------------------

MU, S = 0.7, 0.5  # data x0 ~ N(MU, S^2), elementwise


def gaussian_flow_denoiser(x, sigma):
    """E[x0 | x] for x = (1 - t) x0 + t eps: MU + (1 - t) S^2 / var_t (x - (1 - t) MU)."""
    t = sigma.reshape(-1, 1, 1, 1)
    a = 1 - t
    return MU + a * S**2 / (a**2 * S**2 + t**2) * (x - a * MU)


ODE = {
    "euler": sample_euler,
    "heun": sample_heun,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "unipc": sample_unipc,
    "dpmpp_2m_sde eta 0": lambda d, x, s: sample_dpmpp_2m_sde(d, x, s, eta=0.0, flow=True),
    "dpmpp_3m_sde eta 0": lambda d, x, s: sample_dpmpp_3m_sde(d, x, s, eta=0.0, flow=True),
    "euler_ancestral eta 0": lambda d, x, s: sample_euler_ancestral(d, x, s, eta=0.0, flow=True),
}


@pytest.mark.parametrize("name", ODE)
def test_ode_samplers_follow_the_exact_flow(name):
    """The probability-flow ODE of Gaussian data maps noise z to MU + S z, sample by sample:
    every ODE solver in sigma works on a flow model through its denoiser, since
    dx/dsigma = (x - D) / sigma in both spaces."""
    z = torch.randn(1, 1, 1, 2000, generator=torch.Generator().manual_seed(1))
    out = ODE[name](gaussian_flow_denoiser, z, flow_sigmas("simple", 200, {"shift": 1.0}))
    assert (out - (MU + S * z)).abs().max().item() < 0.03


STOCHASTIC = [
    (sample_euler_ancestral, {}),
    (sample_euler_ancestral, {"eta": 0.5}),
    (sample_dpmpp_2m_sde, {}),
    (sample_dpmpp_2m_sde, {"solver_type": "heun"}),
    (sample_dpmpp_3m_sde, {}),
]


@pytest.mark.parametrize("flow", [True, False])
@pytest.mark.parametrize("fn,options", STOCHASTIC)
def test_stochastic_flow_forms_sample_the_data(fn, options, flow):
    """With flow=True the samples have the data's statistics; the k-space forms add noise
    without shrinking the signal and miss them (the check can fail)."""
    n = 4000
    noise = make_noise([torch.Generator().manual_seed(100)], (n,))
    batch_noise = lambda: noise().reshape(1, 1, 1, n)  # noqa: E731
    sigmas = flow_sigmas("simple", 200, {"shift": 1.0})
    out = fn(gaussian_flow_denoiser, batch_noise(), sigmas, noise=batch_noise, flow=flow, **options)
    error = max(abs(out.mean().item() - MU), abs(out.std().item() - S))
    assert (error < 0.03) == flow, (out.mean().item(), out.std().item())
