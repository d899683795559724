"""The Denoiser adapter (parametrisations, sigma <-> t) and classifier-free guidance."""

import pytest
import torch

from ldm.denoiser import Denoiser
from ldm.guidance import cfg
from ldm.sampling.schedules import NoiseSchedule
from ldm.text.cond import Cond

SD1 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class Recorder(torch.nn.Module):
    """A network that records its inputs and returns a fixed function of them."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, encoder_hidden_states, encoder_attention_mask=None):
        self.calls.append((x, t, encoder_hidden_states, encoder_attention_mask))
        ctx = encoder_hidden_states.mean((1, 2))[:, None, None, None]
        return torch.sin(x[:, :4] * 1.3 + t.reshape(-1, 1, 1, 1) / 500) + ctx + 0.1 * x[:, -1:]


def make(prediction_type="epsilon", **kw):
    schedule = NoiseSchedule.from_scheduler_config(SD1, prediction_type=prediction_type)
    net = Recorder()
    return Denoiser(net, schedule, **kw), net, schedule


def test_sigma_t_round_trip_and_k_diffusion():
    from k_diffusion.external import DiscreteSchedule

    den, _, schedule = make()
    t = torch.tensor([0.0, 1.0, 17.0, 500.0, 998.0, 999.0])
    torch.testing.assert_close(den.sigma_to_t(den.t_to_sigma(t)), t, atol=1e-3, rtol=0)
    kd = DiscreteSchedule(schedule.sigmas, quantize=False)
    sigmas = torch.exp(torch.linspace(schedule.sigmas[0].log(), schedule.sigmas[-1].log(), 37))
    torch.testing.assert_close(den.sigma_to_t(sigmas), kd.sigma_to_t(sigmas), atol=1e-3, rtol=0)
    kdq = DiscreteSchedule(schedule.sigmas, quantize=True)
    nearest, _, _ = make(interpolation="nearest")
    assert torch.equal(nearest.sigma_to_t(sigmas), kdq.sigma_to_t(sigmas).float())


def test_linear_interpolation_inverts_diffusers_interp():
    den, _, schedule = make(interpolation="linear")
    t = torch.tensor([998.5, 417.25, 3.75])
    sigma = torch.from_numpy(
        __import__("numpy").interp(t.numpy(), range(1000), schedule.sigmas.double().numpy())
    ).float()
    torch.testing.assert_close(den.sigma_to_t(sigma), t, atol=2e-3, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_parametrisations_closed_form(prediction_type):
    den, net, schedule = make(prediction_type)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 3
    t = torch.tensor([100, 700])
    sigma = schedule.sigmas[t]
    cond = Cond(torch.randn(2, 5, 8), mask=torch.ones(2, 5, dtype=torch.bool))
    got = den(x, sigma, cond)
    abar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_vp = x * abar.sqrt()  # the network's variance-preserving input
    out = net(x_vp, t.float(), cond.context)
    if prediction_type == "epsilon":
        x0 = (x_vp - (1 - abar).sqrt() * out) / abar.sqrt()
    elif prediction_type == "v_prediction":
        x0 = abar.sqrt() * x_vp - (1 - abar).sqrt() * out
    else:
        x0 = out
    torch.testing.assert_close(got, x0, rtol=1e-5, atol=1e-5)
    xin, tin, ctx, mask = net.calls[0]
    torch.testing.assert_close(xin, x_vp)
    torch.testing.assert_close(tin, t.float())
    assert ctx is cond.context and mask is cond.mask


def test_inpainting_concat_channels():
    den, net, schedule = make()
    x = torch.randn(1, 4, 3, 3)
    extra = torch.randn(1, 5, 3, 3)
    den(x, schedule.sigmas[400], Cond(torch.randn(1, 5, 8)), concat=extra)
    xin = net.calls[0][0]
    assert xin.shape == (1, 9, 3, 3) and torch.equal(xin[:, 4:], extra)


def conds():
    g = torch.Generator().manual_seed(3)
    return Cond(torch.randn(2, 5, 8, generator=g)), Cond(torch.randn(2, 5, 8, generator=g))


def test_scale_one_is_conditioned_denoiser_in_one_pass():
    den, net, schedule = make()
    cond, uncond = conds()
    x, sigma = torch.randn(2, 4, 3, 3), schedule.sigmas[300]
    for scale in (1.0, 0.5):
        net.calls.clear()
        got = cfg(den, cond, uncond, scale)(x, sigma)
        assert len(net.calls) == 1 and net.calls[0][0].shape[0] == 2
        assert torch.equal(got, den(x, sigma, cond))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_equals_diffusers_formula(prediction_type, rescale):
    """Batched and sequential CFG equal diffusers' combination in the network's output space."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    den, net, schedule = make(prediction_type)
    cond, uncond = conds()
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * 4
    t = 640
    sigma, abar = schedule.sigmas[t], schedule.alphas_cumprod[t]
    x_vp = x * abar.sqrt()
    out_u = net(x_vp, torch.tensor(float(t)), uncond.context)
    out_c = net(x_vp, torch.tensor(float(t)), cond.context)
    pred = out_u + 7.5 * (out_c - out_u)
    if rescale:
        pred = rescale_noise_cfg(pred, out_c, guidance_rescale=rescale)
    if prediction_type == "epsilon":
        want = (x_vp - (1 - abar).sqrt() * pred) / abar.sqrt()
    else:
        want = abar.sqrt() * x_vp - (1 - abar).sqrt() * pred
    for batched in (True, False):
        net.calls.clear()
        got = cfg(den, cond, uncond, 7.5, rescale=rescale, batched=batched)(x, sigma)
        assert len(net.calls) == (1 if batched else 2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_guidance_passes_concat_to_both_halves():
    den, net, schedule = make()
    cond, uncond = conds()
    extra = torch.randn(2, 5, 3, 3)
    cfg(den, cond, uncond, 3.0, concat=extra)(torch.randn(2, 4, 3, 3), schedule.sigmas[10])
    xin = net.calls[0][0]
    assert xin.shape == (4, 9, 3, 3) and torch.equal(xin[:2, 4:], extra)
