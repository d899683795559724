"""The SD3 / FLUX VAE: 16 latent channels, no quant convs, scaling and shift read from config,
against diffusers' AutoencoderKL and the SD3 pipelines' latent arithmetic."""

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import (
    retrieve_latents,
)

from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL

# stabilityai/stable-diffusion-3.5-medium vae/config.json, as shipped
SD3_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.31.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}


def _tiny(scaling: float, shift: float) -> dict:
    """SD3's VAE at a tiny width: same block kinds, 16 latent channels, no quant convs."""
    return dict(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


SHAPES = {"sd3": _tiny(1.5305, 0.0609), "flux": _tiny(0.3611, 0.1159)}


def _pair(cfg: dict) -> tuple[DiffusersVAE, AutoencoderKL]:
    torch.manual_seed(0)
    ref = DiffusersVAE(**cfg).eval()
    ours = AutoencoderKL(AutoencoderConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref, ours


def _pixels(b: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = a.abs().max().item()
    assert scale > 1e-2
    assert (a - b).abs().max().item() <= 1e-5 * scale


def test_sd3_config_reads_as_shipped():
    cfg = AutoencoderConfig.from_diffusers(SD3_VAE_CONFIG)
    assert (cfg.latent_channels, cfg.scaling_factor, cfg.shift_factor) == (16, 1.5305, 0.0609)
    assert not cfg.use_quant_conv and not cfg.use_post_quant_conv
    back = cfg.to_diffusers()  # written back as shipped, less the fields ldm refuses if set
    assert set(SD3_VAE_CONFIG) - set(back) == {"_diffusers_version", "latents_mean", "latents_std"}
    for key, value in back.items():
        assert SD3_VAE_CONFIG[key] == value, key


@torch.no_grad()
@pytest.mark.parametrize("shape", SHAPES)
def test_no_quant_convs_and_strict_weights(shape):
    ref, ours = _pair(SHAPES[shape])
    keys = set(ours.state_dict())
    assert keys == set(ref.state_dict())
    assert not any("quant_conv" in k for k in keys)
    assert ours.encoder.conv_out.out_channels == 32 and ours.decoder.conv_in.in_channels == 16
    assert ours.latent_channels == 16 and ours.factor == 2


@torch.no_grad()
@pytest.mark.parametrize("shape", SHAPES)
def test_encode_decode_equal_diffusers(shape):
    """Posterior, pipeline encode (img2img) and pipeline decode, as the SD3 pipelines write them:
    (retrieve_latents(vae.encode(x)) - shift) * scale and vae.decode(z / scale + shift)."""
    ref, ours = _pair(SHAPES[shape])
    c = ref.config
    x = _pixels()
    post_ref, post = ref.encode(x).latent_dist, ours.encode_dist(x)
    _close(post_ref.mean, post.mean)
    _close(post_ref.logvar, post.logvar)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8)]  # noqa: E731
    want = (retrieve_latents(ref.encode(x), generator=gens()) - c.shift_factor) * c.scaling_factor
    _close(want, ours.encode(x, generator=gens()))
    want_mode = (post_ref.mode() - c.shift_factor) * c.scaling_factor
    _close(want_mode, ours.encode(x, sample=False))
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    _close(ref.decode(latents / c.scaling_factor + c.shift_factor).sample, ours.decode(latents))


@torch.no_grad()
@pytest.mark.parametrize("shape", SHAPES)
def test_scale_and_shift_are_the_configs(shape):
    """The latent arithmetic is exactly the pipelines' (bitwise), with the config's numbers."""
    _, ours = _pair(SHAPES[shape])
    cfg = SHAPES[shape]
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ours.scale_latents(z), (z - cfg["shift_factor"]) * cfg["scaling_factor"])
    # decode's first operation is the inverse map, then the unscaled decoder
    latents = ours.scale_latents(z)
    want = ours.decode_raw(latents / cfg["scaling_factor"] + cfg["shift_factor"])
    assert torch.equal(ours.decode(latents), want)
