"""The Denoiser's parametrisations: EDM scalings, the training pair against diffusers, flow."""

import pytest
import torch
import torch.nn.functional as F

from ldm.denoiser import Denoiser, parametrisation
from ldm.sampling.schedules import NoiseSchedule
from ldm.text.cond import Cond

SCHEDULES = {  # diffusers scheduler configs: SD 1.x (eps), SD 2.x-v, a linear and a cosine one
    "sd1-eps": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    "sd2-v": dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
    ),  # fmt: skip
    "linear-eps": dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    "cosine-v": dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
}
TIMESTEPS = torch.tensor([0, 1, 17, 250, 500, 731, 998, 999])  # 8, as data() draws


def net(x_in, t, encoder_hidden_states, encoder_attention_mask=None):
    """A fixed nonlinear function of all its inputs, standing in for a U-Net."""
    ctx = encoder_hidden_states.mean((1, 2)).reshape(-1, 1, 1, 1)
    return torch.sin(1.7 * x_in + t.float().reshape(-1, 1, 1, 1) / 300) + ctx


def data(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, 5, 5, generator=g) * 1.5
    noise = torch.randn(b, 4, 5, 5, generator=g)
    return x0, noise, Cond(torch.randn(b, 3, 8, generator=g))


@pytest.mark.parametrize("name", SCHEDULES)
def test_training_pair_equals_diffusers_add_noise_and_get_velocity(name):
    """Bit for bit: the network's training input, timestep and target (eps or v)."""
    from diffusers import DDPMScheduler

    config = SCHEDULES[name]
    ref = DDPMScheduler(**config)
    den = Denoiser(net, NoiseSchedule.from_scheduler_config(config))
    x0, noise, _ = data()
    x_in, c_noise, target = den.training_pair(x0, noise, den.sigmas[TIMESTEPS], t=TIMESTEPS)
    assert torch.equal(x_in, ref.add_noise(x0, noise, TIMESTEPS))
    assert torch.equal(c_noise, TIMESTEPS)
    want = (
        noise if ref.config.prediction_type == "epsilon" else ref.get_velocity(x0, noise, TIMESTEPS)
    )
    assert torch.equal(target, want)


@pytest.mark.parametrize("name", ["sd1-eps", "sd2-v"])
def test_loss_is_the_network_mse_against_the_diffusers_target(name):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(**SCHEDULES[name])
    den = Denoiser(net, NoiseSchedule.from_scheduler_config(SCHEDULES[name]))
    x0, noise, cond = data()
    got = den.loss(x0, noise, den.sigmas[TIMESTEPS], cond, t=TIMESTEPS)
    pred = net(ref.add_noise(x0, noise, TIMESTEPS), TIMESTEPS, cond.context)
    target = noise if name == "sd1-eps" else ref.get_velocity(x0, noise, TIMESTEPS)
    assert got.shape == (len(TIMESTEPS),)
    assert torch.equal(got, F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)))


def karras_table1(name, sigma):
    """(c_skip, c_out, c_in) written out from Karras et al. 2022, Table 1 (and D = x - t v)."""
    root = (sigma**2 + 1) ** 0.5
    one, zero = torch.ones_like(sigma), torch.zeros_like(sigma)
    return {
        "epsilon": (one, -sigma, 1 / root),
        "v_prediction": (1 / (sigma**2 + 1), -sigma / root, 1 / root),
        "sample": (zero, one, 1 / root),
        "flow": (one, -sigma, one),
    }[name]


def interpolant(name, sigma):
    """(alpha, sigma_in) of the network's input: VP sqrt(abar), sqrt(1 - abar); flow 1 - t, t."""
    if name == "flow":
        return 1 - sigma, sigma
    abar = 1 / (1 + sigma.double() ** 2)
    return abar.sqrt().float(), (1 - abar).sqrt().float()


def make(name):
    if name == "flow":
        return Denoiser(net, None, prediction="flow")
    return Denoiser(net, NoiseSchedule.from_scheduler_config(SCHEDULES["sd1-eps"]), prediction=name)


NAMES = ["epsilon", "v_prediction", "sample", "flow"]


def sigmas_for(name):
    if name == "flow":
        return torch.tensor([0.05, 0.3, 0.5, 0.8, 1.0])
    return torch.tensor([0.03, 0.4, 1.0, 3.0, 14.6])


@pytest.mark.parametrize("name", NAMES)
def test_scalings_follow_table_1(name):
    sigma = sigmas_for(name).reshape(-1, 1, 1, 1)
    got = parametrisation(name).scalings(sigma)
    for g, w in zip(got, karras_table1(name, sigma)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_an_oracle_network_denoises_exactly(name):
    """A network that outputs its training target makes D(x, sigma) = x0, for every sigma; the
    network sees x_in = alpha x0 + sigma_in eps and the timestep the Denoiser maps sigma to."""
    den = make(name)
    sigma = sigmas_for(name)
    x0, noise, cond = data(len(sigma))
    s = sigma.reshape(-1, 1, 1, 1)
    alpha, sigma_in = interpolant(name, s)
    target = {"epsilon": noise, "v_prediction": alpha * noise - sigma_in * x0, "sample": x0,
              "flow": noise - x0}[name]  # fmt: skip
    seen = []

    def oracle(x_in, t, encoder_hidden_states):
        seen.append((x_in, t))
        return target

    den.network = oracle
    x = den.parametrisation.noised(x0, noise, s)
    torch.testing.assert_close(den(x, sigma, cond), x0, rtol=1e-5, atol=1e-5)
    x_in, t = seen[0]
    torch.testing.assert_close(x_in, alpha * x0 + sigma_in * noise, rtol=1e-5, atol=1e-5)
    want_t = sigma * 1000 if name == "flow" else den.sigma_to_t(sigma)
    torch.testing.assert_close(t, want_t)


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_the_denoised_error_over_c_out_squared(name):
    """EDM eq. 8: ||F - target||^2 = ||D - x0||^2 / c_out^2 (continuous sigma, no table)."""
    den = make(name)
    sigma = sigmas_for(name)
    x0, noise, cond = data(len(sigma))
    s = sigma.reshape(-1, 1, 1, 1)
    x = den.parametrisation.noised(x0, noise, s)
    c_out = karras_table1(name, s)[1].reshape(-1)
    want = (den(x, sigma, cond) - x0).pow(2).mean(dim=(1, 2, 3)) / c_out**2
    torch.testing.assert_close(den.loss(x0, noise, sigma, cond), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_output_and_denoised_round_trip(name):
    den = make(name)
    sigma = sigmas_for(name)
    x, out, _ = data(len(sigma))
    back = den.denoised_to_output(x, sigma, den.output_to_denoised(x, sigma, out))
    torch.testing.assert_close(back, out, rtol=1e-4, atol=1e-5)


def test_flow_is_x_minus_t_v_and_one_euler_step_reaches_x0():
    """Rectified flow: D(x, t) = x - t v; with the true velocity eps - x0, one Euler step from
    t = 1 (pure noise) to t = 0 lands on x0, since the path is straight."""
    den = make("flow")
    x0, noise, cond = data(2)
    t = torch.tensor([0.25, 0.9])
    x = (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * noise
    v = net(x, t * 1000, cond.context)
    torch.testing.assert_close(den(x, t, cond), x - t.reshape(-1, 1, 1, 1) * v)
    den.network = lambda x_in, t, encoder_hidden_states: noise - x0
    x1 = noise
    d = (x1 - den(x1, 1.0, cond)) / 1.0  # k-diffusion's derivative (x - D) / sigma
    torch.testing.assert_close(x1 + (0.0 - 1.0) * d, x0)
    assert float(den.sigma_min) == 0.0 and float(den.sigma_max) == 1.0
    torch.testing.assert_close(den.t_to_sigma(den.sigma_to_t(t)), t)


def test_dtype_runs_the_network_in_its_dtype_and_returns_float32():
    """The pipeline's fp16/bf16 path: network input cast to the network dtype, output fp32."""
    schedule = NoiseSchedule.from_scheduler_config(SCHEDULES["sd1-eps"])
    dtypes = []

    def recording(x_in, t, encoder_hidden_states):
        dtypes.append(x_in.dtype)
        return net(x_in, t, encoder_hidden_states)

    x, _, cond = data(2)
    sigma = torch.tensor([0.5, 2.0])
    got = Denoiser(recording, schedule, dtype=torch.bfloat16)(x, sigma, cond)

    def by_hand(x_in, t, **kw):  # what the pipeline's _in_dtype wrapper did
        return net(x_in.to(torch.bfloat16), t, **kw).float()

    assert dtypes == [torch.bfloat16] and got.dtype == torch.float32
    assert torch.equal(got, Denoiser(by_hand, schedule)(x, sigma, cond))
    fp32 = Denoiser(recording, schedule, "log", dtype=torch.float32)  # float32: no cast
    assert torch.equal(fp32(x, sigma, cond), Denoiser(net, schedule)(x, sigma, cond))


def test_bad_parametrisations_are_refused():
    schedule = NoiseSchedule.from_scheduler_config(SCHEDULES["sd1-eps"])
    with pytest.raises(ValueError, match="prediction type must be one of"):
        Denoiser(net, schedule, prediction="x1")
    with pytest.raises(ValueError, match="needs prediction='flow'"):
        Denoiser(net, None)
    with pytest.raises(ValueError, match="needs a NoiseSchedule"):
        Denoiser(net, None, prediction="epsilon")
