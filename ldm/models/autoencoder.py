"""KL-regularised autoencoder of Stable Diffusion (Rombach et al. 2022, Sec. 3.1 and App. G).

Parameter names follow diffusers' ``AutoencoderKL``. This class owns the latent contract:
``encode`` returns scaled latents ``(z - shift_factor) * scaling_factor`` and ``decode`` undoes
that, so no other module knows the scaling constant. Sliced (per image) and tiled (overlapping
tiles, linearly blended) paths bound the memory for large batches and images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ldm.errors import ConfigError
from ldm.models.config_io import DiffusersConfig
from ldm.models.layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D

Generator = torch.Generator | list[torch.Generator] | None

# diffusers fields ldm does not implement, with the only value it accepts
_UNSUPPORTED: dict[str, Any] = {"latents_mean": None, "latents_std": None}


@dataclass
class AutoencoderConfig(DiffusersConfig):
    """Architecture and latent scaling; names and defaults are diffusers' ``config.json`` keys."""

    class_name = "AutoencoderKL"
    where = "vae config"
    unsupported = _UNSUPPORTED

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32  # informational: the training image size
    scaling_factor: float = 0.18215  # latents ~ unit variance (LDM App. G); SD 1.x/2.x value
    shift_factor: float | None = None  # subtracted before scaling (None: 0)
    force_upcast: bool = True  # run this VAE in fp32 under fp16 (where the family honours it)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        self.block_out_channels = tuple(self.block_out_channels)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field this implementation cannot honour."""
        n = len(self.block_out_channels)
        for name, allowed in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            kinds = getattr(self, name)
            if len(kinds) != n or any(k != allowed for k in kinds):
                raise ConfigError(f"vae config: {name}={list(kinds)} is not supported")
        if self.act_fn != "silu":
            raise ConfigError(f"vae config: act_fn={self.act_fn!r} is not supported")


def randn_like_per_sample(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """Standard normal like ``x``; with a list of generators, sample i draws from generator i."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        dev = generator[0].device
        draws = [torch.randn(x[:1].shape, generator=g, device=dev) for g in generator]
        return torch.cat(draws).to(x.device, x.dtype)
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev).to(x.device, x.dtype)


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, diag(exp(logvar))) (Kingma & Welling 2014)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as SD's original code, to keep exp finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Generator = None) -> torch.Tensor:
        """Reparametrised sample mean + std * eps, eps drawn per sample from ``generator``."""
        return self.mean + self.std * randn_like_per_sample(self.mean, generator)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions."""
        var = torch.exp(self.logvar)
        return 0.5 * torch.sum(self.mean**2 + var - 1.0 - self.logvar, dim=[1, 2, 3])


class MidBlock(nn.Module):
    """UNetMidBlock2D of the VAE: resnet, single-head self-attention over pixels, resnet."""

    def __init__(self, ch: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, None, groups, 1e-6) for _ in range(2))
        attn = Attention(ch, 1, ch, bias=True, norm_num_groups=groups, eps=1e-6)
        self.attentions = nn.ModuleList([attn] if add_attention else [])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h)
        for attn in self.attentions:
            h = attn(h)
        return self.resnets[1](h)


class _Block(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional resample."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, 1e-6)
            for i in range(layers)
        )
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out_ch)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            h = resnet(h)
        for sampler in getattr(self, "downsamplers", getattr(self, "upsamplers", [])):
            h = sampler(h)
        return h


class Encoder(nn.Module):
    """Pixels (B, 3, H, W) -> moments (B, 2*latent, H/f, W/f) before quant_conv."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        chs, g, n = c.block_out_channels, c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            _Block(chs[max(i - 1, 0)], chs[i], c.layers_per_block, g, "down" if i < n - 1 else None)
            for i in range(n)
        )
        self.mid_block = MidBlock(chs[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chs[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, latent, h, w) after post_quant_conv -> pixels (B, 3, h*f, w*f)."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        rchs, g, n = (
            tuple(reversed(c.block_out_channels)),
            c.norm_num_groups,
            len(c.block_out_channels),
        )
        self.conv_in = nn.Conv2d(c.latent_channels, rchs[0], 3, padding=1)
        self.mid_block = MidBlock(rchs[0], g, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            _Block(
                rchs[max(i - 1, 0)], rchs[i], c.layers_per_block + 1, g, "up" if i < n - 1 else None
            )
            for i in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(g, rchs[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(rchs[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, max(size - tile, 0) + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)  # last tile flush with the border
    return starts


def _ramp(n: int, overlap: int, device: torch.device) -> torch.Tensor:
    """Weights rising linearly over ``overlap`` samples at both ends of a tile, 1 inside."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    return ((torch.minimum(i + 1, n - i)) / (overlap + 1)).clamp(max=1.0)


def tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Apply ``fn`` to overlapping ``tile``-sized tiles of x and blend the outputs linearly.

    ``scale`` is the output/input size ratio (f for decode, 1/f for encode); each output pixel
    is the weighted mean of the tiles covering it, weights ramping up across the overlap, so
    seams fade in over ``overlap`` pixels instead of jumping.
    """
    _, _, h, w = x.shape
    stride = max(tile - overlap, 1)
    out = weight = None
    for top in _tile_starts(h, tile, stride):
        for left in _tile_starts(w, tile, stride):
            y = fn(x[:, :, top : top + tile, left : left + tile])
            if out is None:
                shape = (y.shape[0], y.shape[1], round(h * scale), round(w * scale))
                out = y.new_zeros(shape)
                weight = y.new_zeros((1, 1, shape[2], shape[3]))
            th, tw, ov = y.shape[2], y.shape[3], round(overlap * scale)
            wt = (_ramp(th, ov, y.device)[:, None] * _ramp(tw, ov, y.device)[None, :]).to(y.dtype)
            t, lft = round(top * scale), round(left * scale)
            out[:, :, t : t + th, lft : lft + tw] += y * wt
            weight[:, :, t : t + th, lft : lft + tw] += wt
    return out / weight


class AutoencoderKL(nn.Module):
    """Pixels in [-1, 1] <-> scaled latents (the only owner of scaling_factor/shift_factor)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        lc = c.latent_channels
        self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if c.use_post_quant_conv else None
        self.use_slicing = False
        self.tile_size: int | None = None  # pixels; None: tiling off
        self.tile_overlap = 0

    @property
    def factor(self) -> int:
        """Spatial downscale between pixels and latents."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def enable_slicing(self, enabled: bool = True) -> None:
        """Encode/decode one image at a time (memory bound by one image)."""
        self.use_slicing = enabled

    def enable_tiling(self, tile_size: int = 512, overlap: int = 64) -> None:
        """Encode/decode images larger than ``tile_size`` pixels in blended overlapping tiles."""
        if tile_size % self.factor or overlap % self.factor or not 0 <= overlap < tile_size:
            raise ValueError(f"tile_size and overlap must be multiples of {self.factor}")
        self.tile_size, self.tile_overlap = tile_size, overlap

    def disable_tiling(self) -> None:
        self.tile_size = None

    def _moments(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.encoder(pixels)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _run(self, fn, x: torch.Tensor, tile: int | None, overlap: int, scale: float):
        """Apply fn per image (slicing) and/or per tile (tiling) when enabled."""
        if tile is not None and max(x.shape[2:]) > tile:
            run = lambda t: tiled(fn, t, tile, overlap, scale)  # noqa: E731
        else:
            run = fn
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([run(x[i : i + 1]) for i in range(x.shape[0])])
        return run(x)

    def encode_dist(self, pixels: torch.Tensor) -> DiagonalGaussian:
        """Posterior over unscaled latents for pixels (B, 3, H, W) in [-1, 1]."""
        tile = self.tile_size
        f = self.factor
        moments = self._run(self._moments, pixels, tile, self.tile_overlap, 1.0 / f)
        return DiagonalGaussian(moments)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw posterior latents -> the diffusion model's latents: (z - shift) * scale."""
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> pixels, no slicing or tiling (the training round trip)."""
        return self._decode_raw(z)

    def encode(
        self, pixels: torch.Tensor, generator: Generator = None, sample: bool = True
    ) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents (posterior sample, or its mode if not sample)."""
        dist = self.encode_dist(pixels)
        return self.scale_latents(dist.sample(generator) if sample else dist.mode())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels, nominally in [-1, 1] (not clamped)."""
        z = latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)
        tile = None if self.tile_size is None else self.tile_size // self.factor
        overlap = self.tile_overlap // self.factor
        return self._run(self._decode_raw, z, tile, overlap, float(self.factor))

    def forward(self, pixels: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        """Reconstruction: decode(encode(pixels))."""
        return self.decode(self.encode(pixels, generator))
