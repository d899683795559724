"""Flow sigma schedules: diffusers' FlowMatchEulerDiscreteScheduler and ComfyUI's schedulers."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ldm.errors import ConfigError, LdmError
from ldm.sampling.flow import FLOW_SCHEDULES, flow_mu, flow_sigmas

# stabilityai/stable-diffusion-3.5-medium and black-forest-labs/FLUX.1-dev scheduler configs
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX = dict(
    SD3,
    shift=3.0,  # ignored under dynamic shifting
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
CONFIGS = {
    "shift1": {"num_train_timesteps": 1000},
    "sd3": SD3,
    "flux": FLUX,
    "flux_linear": dict(FLUX, time_shift_type="linear", base_shift=0.95, max_shift=2.05),
    "terminal": dict(SD3, shift_terminal=0.1),
    "karras": dict(SD3, use_karras_sigmas=True),
    "exponential": dict(FLUX, use_exponential_sigmas=True),
    "beta": dict(SD3, use_beta_sigmas=True),
}


def _seq_len(config: dict, image_seq_len: int) -> int | None:
    return image_seq_len if config.get("use_dynamic_shifting") else None


# (config, image tokens): SD3 at 1024^2 has 4096 tokens of 2x2 latent patches
DEFAULT_CASES = [
    (name, seq)
    for name, config in CONFIGS.items()
    for seq in ((256, 1024, 4096) if config.get("use_dynamic_shifting") else (None,))
]


@pytest.mark.parametrize("steps", [1, 2, 4, 20, 28, 50])
@pytest.mark.parametrize("name,seq", DEFAULT_CASES)
def test_default_equals_diffusers(name, seq, steps):
    config = CONFIGS[name]
    if name == "terminal" and steps == 1:
        pytest.skip("diffusers divides 0 by 0 there (nan); ldm keeps sigma 1")
    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = None
    if seq is not None:  # as the FLUX pipeline computes it, from the config
        c = ref.config
        mu = calculate_shift(
            seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift
        )
        assert flow_mu(config, seq) == pytest.approx(mu, abs=1e-12)
    ref.set_timesteps(steps, mu=mu)
    ours = flow_sigmas("default", steps, config, image_seq_len=seq)
    assert ours.dtype == torch.float32 and ours.shape == ref.sigmas.shape
    torch.testing.assert_close(ours, ref.sigmas, atol=1e-6, rtol=0)
    # the network's timestep is sigma * 1000 (ldm.denoiser.Flow), diffusers' timesteps
    torch.testing.assert_close(ours[:-1] * 1000, ref.timesteps, atol=1e-3, rtol=0)


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize(
    "name,seq", [("flux", 256), ("flux", 4096), ("sd3", None), ("terminal", None)]
)
def test_pipeline_sigmas_equal_flux_pipeline(name, seq, steps):
    """FluxPipeline passes sigmas = linspace(1, 1/N, N) and mu to set_timesteps."""
    if name == "terminal" and steps == 1:
        pytest.skip("one step: the stretch divides by zero in diffusers")
    config = CONFIGS[name]
    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = None if seq is None else flow_mu(config, seq)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = flow_sigmas("default", steps, config, image_seq_len=seq, pipeline_sigmas=True)
    torch.testing.assert_close(ours, ref.sigmas, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[:-1] * 1000, ref.timesteps, atol=1e-3, rtol=0)


def test_diffusers_shifts_twice():
    """The quirk reproduced: the last sigma of SD3's schedule is shift(shift(1/1000))."""
    shift = lambda t: 3 * t / (1 + 2 * t)  # noqa: E731
    sigmas = flow_sigmas("default", 4, SD3)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert sigmas[-2].item() == pytest.approx(shift(shift(1e-3)), rel=1e-6)
    assert sigmas[-2].item() != pytest.approx(shift(1e-3), rel=1e-3)


def _comfy_table(config: dict, seq: int | None) -> np.ndarray:
    """ModelSamplingDiscreteFlow.sigmas (T = 1000, shift) / ModelSamplingFlux (T = 10000, mu)."""
    if config.get("use_dynamic_shifting"):
        mu = flow_mu(config, seq)
        t = np.arange(1, 10001) / 10000
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    s = config.get("shift", 1.0)
    t = np.arange(1, 1001) / 1000
    return s * t / (1 + (s - 1) * t)


def _comfy_sigma(config: dict, seq: int | None, t: np.ndarray) -> np.ndarray:
    """ModelSampling*.sigma(timestep) on t = timestep / multiplier."""
    if config.get("use_dynamic_shifting"):
        mu = flow_mu(config, seq)
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    s = config.get("shift", 1.0)
    return s * t / (1 + (s - 1) * t)


def _comfy(name: str, n: int, config: dict, seq: int | None) -> np.ndarray:
    """comfy/samplers.py's schedulers, written out from their definitions."""
    table = _comfy_table(config, seq)
    s_min, s_max = table[0], table[-1]
    if name == "simple":  # simple_scheduler
        ss = len(table) / n
        sigs = [table[-(1 + int(x * ss))] for x in range(n)]
    elif name == "uniform":  # normal_scheduler: timestep(sigma) = sigma * multiplier
        sigs = list(_comfy_sigma(config, seq, np.linspace(s_max, s_min, n)))
    elif name == "sgm_uniform":
        sigs = list(_comfy_sigma(config, seq, np.linspace(s_max, s_min, n + 1)[:-1]))
    elif name == "karras":  # get_sigmas_karras(n, sigma_min, sigma_max), rho 7
        ramp = np.linspace(0, 1, n)
        sigs = list((s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7)
    elif name == "exponential":
        sigs = list(np.exp(np.linspace(math.log(s_max), math.log(s_min), n)))
    else:  # beta_scheduler
        from scipy.stats import beta

        ts = 1 - np.linspace(0, 1, n, endpoint=False)
        ts = np.rint(beta.ppf(ts, 0.6, 0.6) * (len(table) - 1))
        sigs, last = [], -1
        for t in ts:
            if t != last:
                sigs.append(table[int(t)])
            last = t
    return np.array([*sigs, 0.0])


@pytest.mark.parametrize("steps", [1, 3, 20, 30, 200])
@pytest.mark.parametrize("config", ["shift1", "sd3", "flux"])
@pytest.mark.parametrize("name", [n for n in FLOW_SCHEDULES if n != "default"])
def test_comfy_schedules(name, config, steps):
    config = CONFIGS[config]
    seq = _seq_len(config, 1024)
    want = torch.from_numpy(_comfy(name, steps, config, seq)).float()
    got = flow_sigmas(name, steps, config, image_seq_len=seq)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_static_uniform_is_diffusers_default(steps):
    """ComfyUI's "normal" and diffusers' set_timesteps space t between the shifted ends and
    shift again: the same schedule from two code bases."""
    for config in (SD3, CONFIGS["shift1"]):
        torch.testing.assert_close(
            flow_sigmas("uniform", steps, config),
            flow_sigmas("default", steps, config),
            atol=1e-6,
            rtol=0,
        )


def test_simple_is_the_single_shift():
    """SD3 paper eq. 23: sigma = s t / (1 + (s - 1) t) at t = 1, 3/4, 1/2, 1/4."""
    t = torch.tensor([1.0, 0.75, 0.5, 0.25])
    want = torch.cat([3 * t / (1 + 2 * t), torch.zeros(1)])
    torch.testing.assert_close(flow_sigmas("simple", 4, SD3), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", FLOW_SCHEDULES)
def test_descending_to_exactly_one_zero(name, config):
    config = CONFIGS[config]
    for steps in (1, 2, 9, 40):
        s = flow_sigmas(name, steps, config, image_seq_len=_seq_len(config, 4096))
        assert s.dtype == torch.float32 and s[-1] == 0 and (s[:-1] > 0).all()
        assert (s[:-1] <= 1).all() and (s.diff() < 0).all()
        assert len(s) == steps + 1 or name == "beta"  # ComfyUI's beta drops repeats


def test_errors():
    with pytest.raises(LdmError, match="image_seq_len"):
        flow_sigmas("default", 4, FLUX)
    with pytest.raises(LdmError, match="unknown schedule"):
        flow_sigmas("polyexponential", 4, SD3)
    with pytest.raises(LdmError, match="steps"):
        flow_sigmas("default", 0, SD3)
    with pytest.raises(ConfigError, match="invert_sigmas"):
        flow_sigmas("default", 4, dict(SD3, invert_sigmas=True))
    with pytest.raises(ConfigError, match="only one"):
        flow_sigmas("default", 4, dict(SD3, use_karras_sigmas=True, use_beta_sigmas=True))
    with pytest.raises(ConfigError, match="time_shift_type"):
        flow_sigmas("default", 4, dict(FLUX, time_shift_type="cubic"), image_seq_len=256)
