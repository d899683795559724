"""Training-noise options: noise offset and kohya's multi-resolution (pyramid) noise."""

import torch
import torch.nn.functional as F

from ldm.train.loss import training_noise


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
