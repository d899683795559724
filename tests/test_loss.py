"""The training objective around the Denoiser: min-SNR weights, the lr schedule, training noise
(noise offset, kohya's multi-resolution / pyramid noise) and the autoencoder loss."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.sampling.schedules import NoiseSchedule
from ldm.train.config import OptimConfig, StageConfig
from ldm.train.loop import lr_at
from ldm.train.loss import autoencoder_loss, min_snr_weight, training_noise

SD1 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("gamma", [5.0, 1.0, None])
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weight_matches_the_closed_form(kind, gamma):
    """Hang et al. 2023: eps min(SNR, g) / SNR, v min(SNR, g) / (SNR + 1), x0 min(SNR, g)."""
    schedule = NoiseSchedule.from_scheduler_config(SD1)
    t = torch.tensor([0, 3, 40, 200, 500, 800, 999])
    # SNR from the betas in float64, independently of the schedule's float32 table
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)[t.numpy()]
    snr = abar / (1 - abar)
    clipped = snr if gamma is None else np.minimum(snr, gamma)
    divisor = {"epsilon": snr, "v_prediction": snr + 1, "sample": np.ones_like(snr)}[kind]
    want = np.ones_like(snr) if gamma is None else clipped / divisor
    got = min_snr_weight(schedule.alphas_cumprod, t, gamma, kind)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4)
    if gamma == 5.0 and kind == "epsilon":  # early t: SNR far above 5, weight 5 / SNR
        assert got[0] < 0.01 and got[-1] == 1.0  # t = 999: SNR < 5, weight 1


def test_min_snr_weight_refuses_a_target_it_has_no_rule_for():
    with pytest.raises(ValueError, match="no rule for prediction type 'flow'"):
        min_snr_weight(torch.rand(10), torch.tensor([1]), 5.0, "flow")


def stage(schedule, warmup=10, steps=110):
    optim = OptimConfig(lr=1e-3, warmup_steps=warmup, schedule=schedule, min_lr_ratio=0.1)
    return StageConfig(steps=steps, optim=optim)


@pytest.mark.parametrize(
    "schedule, expected",
    [  # lr 1e-3, 10 warm-up steps, 110 steps, floor 0.1 x lr; progress p = (step - 10) / 100
        ("constant", {0: 1e-4, 4: 5e-4, 9: 1e-3, 10: 1e-3, 60: 1e-3, 109: 1e-3, 500: 1e-3}),
        # cosine: lr (0.1 + 0.9 * (1 + cos(pi p)) / 2)
        (
            "cosine",
            {
                0: 1e-4,
                9: 1e-3,
                10: 1e-3,
                35: 8.681980515e-4,
                60: 5.5e-4,
                85: 2.318019485e-4,
                110: 1e-4,
                500: 1e-4,
            },
        ),  # fmt: skip
        # linear: lr (0.1 + 0.9 (1 - p))
        ("linear", {0: 1e-4, 9: 1e-3, 10: 1e-3, 35: 7.75e-4, 60: 5.5e-4, 110: 1e-4, 500: 1e-4}),
    ],
)
def test_lr_schedule_at_given_steps(schedule, expected):
    s = stage(schedule)
    for step, lr in expected.items():
        assert math.isclose(lr_at(step, s), lr, rel_tol=1e-9), (step, lr_at(step, s), lr)


def test_lr_schedule_without_warmup_starts_at_lr():
    assert lr_at(0, stage("cosine", warmup=0, steps=100)) == 1e-3
    assert math.isclose(lr_at(50, stage("linear", warmup=0, steps=100)), 5.5e-4, rel_tol=1e-9)


def test_noise_offset_adds_one_draw_per_channel():
    shape = (3, 4, 16, 16)
    g = torch.Generator().manual_seed(1)
    base, per_channel = torch.randn(shape, generator=g), torch.randn((3, 4, 1, 1), generator=g)
    got = training_noise(shape, torch.Generator().manual_seed(1), 0.1)
    assert torch.equal(got, base + 0.1 * per_channel)  # Guttenberg's noise offset


def test_autoencoder_kl_term_is_the_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    pixels = torch.randn(2, 3, 8, 8, generator=g)
    _, terms = autoencoder_loss(pixels, pixels, mean, logvar, 1.0)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    kl = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)).mean()
    assert terms["l1"] == 0 and terms["l2"] == 0
    assert math.isclose(terms["kl"], kl.item(), rel_tol=1e-5)


def _noise(seed: int, **kw) -> torch.Tensor:
    return training_noise((16, 4, 16, 16), torch.Generator().manual_seed(seed), **kw)


def test_plain_noise_is_untouched_when_the_options_are_off():
    expected = torch.randn((16, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_noise(3, offset=0.0), expected)
    assert torch.equal(_noise(3, offset=0.0, multires_iterations=0), expected)


def test_pyramid_noise_is_unit_variance_per_sample_and_deterministic():
    n = _noise(0, offset=0.0, multires_iterations=3, multires_discount=0.8)
    std = n.flatten(1).std(dim=1)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-5)
    assert torch.equal(n, _noise(0, offset=0.0, multires_iterations=3, multires_discount=0.8))
    assert not torch.equal(n, _noise(1, offset=0.0, multires_iterations=3, multires_discount=0.8))


def test_pyramid_noise_moves_power_to_low_frequencies():
    # the mean over an 8x8 patch of white noise has std 1/8; pyramid noise keeps far more
    white = F.avg_pool2d(_noise(0, offset=0.0), 8).std()
    weak = F.avg_pool2d(_noise(0, offset=0.0, multires_iterations=3, multires_discount=0.3), 8)
    strong = F.avg_pool2d(_noise(0, offset=0.0, multires_iterations=3, multires_discount=0.8), 8)
    assert abs(white - 0.125) < 0.02
    assert white < weak.std() < strong.std()
    assert strong.std() > 3 * white
