"""ldm's AutoencoderKL against diffusers' on identical random weights, plus its latent contract."""

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from tiny import VAE

from ldm.errors import ConfigError
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL


def _pair(cfg: dict = VAE, seed: int = 0) -> tuple[DiffusersVAE, AutoencoderKL]:
    torch.manual_seed(seed)
    ref = DiffusersVAE(**cfg).eval()
    ours = AutoencoderKL(AutoencoderConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref, ours


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = a.abs().max().item()
    assert scale > 0.1
    assert (a - b).abs().max().item() <= 1e-5 * scale


def _pixels(b: int = 2, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(3)) * 2 - 1


@torch.no_grad()
def test_encode_decode_match_diffusers() -> None:
    ref, ours = _pair()
    x = _pixels()
    post_ref, post = ref.encode(x).latent_dist, ours.encode_dist(x)
    _close(post_ref.mean, post.mean)
    _close(post_ref.logvar, post.logvar)
    _close(post_ref.kl(), post.kl())
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    sf = ours.config.scaling_factor
    _close(ref.decode(z / sf).sample, ours.decode(z))
    assert ours.factor == 2 and ours.latent_channels == 4


@torch.no_grad()
def test_latent_contract_scaling_shift_and_per_sample_generators() -> None:
    ref, ours = _pair(dict(VAE, scaling_factor=0.5, shift_factor=0.25))
    x = _pixels()
    post_ref = ref.encode(x).latent_dist
    _close((post_ref.mean - 0.25) * 0.5, ours.encode(x, sample=False))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8)]  # noqa: E731
    drawn = ours.encode(x, generator=gens())
    _close((post_ref.sample(generator=gens()) - 0.25) * 0.5, drawn)
    # image 1 depends on its own generator only, not on its batch
    alone = ours.encode(x[1:], generator=[torch.Generator().manual_seed(8)])
    torch.testing.assert_close(alone, drawn[1:], atol=1e-5, rtol=1e-5)
    latents = torch.randn(1, 4, 16, 16)
    _close(ref.decode(latents / 0.5 + 0.25).sample, ours.decode(latents))


@torch.no_grad()
def test_sliced_equals_unsliced() -> None:
    _, ours = _pair()
    x = _pixels(3)
    z = ours.encode(x, sample=False)
    pixels = ours.decode(z)
    ours.enable_slicing()
    torch.testing.assert_close(ours.encode(x, sample=False), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.decode(z), pixels, atol=1e-5, rtol=1e-5)


def _smooth_latents(h: int, w: int, period: int = 8) -> torch.Tensor:
    """Smooth periodic latents: every tile holding whole periods has the image's statistics.

    Tiles only see themselves (GroupNorm statistics, the mid-block attention), so tiled and
    untiled decoding can only agree on inputs whose tiles look like the whole image.
    """
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    phase_y, phase_x = 2 * torch.pi * yy / period, 2 * torch.pi * xx / period
    waves = [torch.sin(phase_x + c) * torch.cos(phase_y - c) for c in range(4)]
    return torch.stack(waves)[None].float() * 0.5


def test_tiled_blend_of_a_local_function_is_exact() -> None:
    from ldm.models.autoencoder import tiled

    x = torch.randn(2, 3, 20, 28)
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=2.0)  # noqa: E731
    torch.testing.assert_close(tiled(up, x, 8, 4, 2.0), up(x))
    down = lambda t: torch.nn.functional.avg_pool2d(t, 2)  # noqa: E731
    torch.testing.assert_close(tiled(down, x, 8, 4, 0.5), down(x))


@torch.no_grad()
def test_tiled_decode_is_close_and_seamless() -> None:
    _, ours = _pair()
    z = _smooth_latents(32, 64)  # -> 64 x 128 pixels, 3 x 1 tiles of 64 px overlapping by 32
    full = ours.decode(z)
    ours.enable_tiling(tile_size=64, overlap=32)
    tiled = ours.decode(z)
    assert tiled.shape == full.shape == (1, 3, 64, 128)
    scale = full.abs().max().item()
    error = tiled - full
    assert error.abs().max().item() < 0.1 * scale
    # no seam jumps: the error field changes gradually (hard-cut tiles give ~0.7 * scale steps)
    for dim in (2, 3):
        assert error.diff(dim=dim).abs().max().item() < 0.15 * scale


@torch.no_grad()
def test_tiled_encode_is_close_and_seamless() -> None:
    _, ours = _pair()
    pixels = _smooth_latents(64, 128, period=16)[:, :3]
    full = ours.encode_dist(pixels).mean
    ours.enable_tiling(tile_size=64, overlap=32)
    tiled = ours.encode_dist(pixels).mean
    assert tiled.shape == full.shape == (1, 4, 32, 64)
    scale = full.abs().max().item()
    error = tiled - full
    assert error.abs().max().item() < 0.1 * scale
    for dim in (2, 3):  # hard-cut tiles give ~0.6 * scale steps here
        assert error.diff(dim=dim).abs().max().item() < 0.15 * scale


def test_tiling_rejects_sizes_off_the_latent_grid() -> None:
    _, ours = _pair()
    with pytest.raises(ValueError):
        ours.enable_tiling(tile_size=33, overlap=8)


def test_config_round_trip_and_errors() -> None:
    cfg = AutoencoderConfig.from_diffusers(dict(VAE, _class_name="AutoencoderKL"))
    assert cfg.scaling_factor == DiffusersVAE(**VAE).config.scaling_factor
    ref = DiffusersVAE.from_config(cfg.to_diffusers())
    assert AutoencoderConfig.from_diffusers(dict(ref.config)) == cfg
    with pytest.raises(ConfigError, match="latents_mean"):
        AutoencoderConfig.from_diffusers(dict(VAE, latents_mean=[0.0] * 4))
    with pytest.raises(ConfigError, match="down_block_types"):
        AutoencoderConfig.from_diffusers(dict(VAE, down_block_types=["AttnDownEncoderBlock2D"] * 2))
    with pytest.raises(ConfigError, match="bogus"):
        AutoencoderConfig.from_diffusers(dict(VAE, bogus=1))
