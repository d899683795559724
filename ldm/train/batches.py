"""Where each training step's images and captions come from.

Batches are a pure function of (global step, rank): the shapes world is indexed, and folder
sources iterate deterministically with a saved position. So a resumed run sees exactly the
batches an uninterrupted one would, and no RNG state has to be checkpointed for the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.shapes import ShapesDataset
from ldm.errors import ConfigError
from ldm.train.config import DataConfig

# SDXL micro-conditioning of one sample, (h, w) order: original size, crop (top, left), target
Sizes = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass
class TrainBatch:
    """One micro-batch as the diffusion step takes it: pixels or cached latent statistics."""

    captions: list[str]
    sizes: list[Sizes]  # per sample (ldm.data.images.CropParams.size_conditioning)
    pixels: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1]
    latent_stats: torch.Tensor | None = None  # (B, 2, C, h, w) posterior mean and std
    latents: torch.Tensor | None = None  # (B, C, h, w) model-space latents (teacher samples)


def uncropped(height: int, width: int, n: int) -> list[Sizes]:
    """Sizes of n images used whole: original = target = (height, width), crop (0, 0)."""
    return [((height, width), (0, 0), (height, width))] * n


def _to_pixels(images: list) -> torch.Tensor:
    """uint8 HWC images -> (B, 3, H, W) float in [-1, 1]."""
    arr = np.stack(
        [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
    )
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _resized(pixels: torch.Tensor, resolution: int) -> torch.Tensor:
    """The world's 64 px renders at the data's resolution (area averaging when smaller)."""
    if pixels.shape[-1] == resolution and pixels.shape[-2] == resolution:
        return pixels
    mode = "area" if resolution < pixels.shape[-1] else "bilinear"
    return F.interpolate(pixels, size=(resolution, resolution), mode=mode)


class ShapesBatches:
    """The shapes world as an endless indexed stream (optionally a fixed pool of cache_size),
    rendered at 64 px and resized to ``data.resolution``."""

    def __init__(self, data: DataConfig, batch_size: int, rank: int = 0, world: int = 1):
        self.dataset = ShapesDataset(
            seed=data.shapes_seed,
            mix=data.shapes_mix,
            size_words_prob=data.shapes_size_words,
            as_array=True,
            layout=data.shapes_layout,
        )
        self.batch_size = batch_size  # per process
        self.resolution = data.resolution
        self.rank, self.world = rank, world
        self.pool = data.cache_size  # 0: every index is a new image
        self.latents: torch.Tensor | None = None  # (pool, 2, C, h, w): posterior mean and std
        self.captions: list[str] | None = None
        self.image_size: tuple[int, int] | None = None  # (H, W) of the cached images

    def indices(self, step: int) -> list[int]:
        start = (step * self.world + self.rank) * self.batch_size
        idx = range(start, start + self.batch_size)
        return [i % self.pool for i in idx] if self.pool else list(idx)

    def images(self, step: int) -> tuple[torch.Tensor, list[str]]:
        items = [self.dataset[i] for i in self.indices(step)]
        pixels = _resized(_to_pixels([im for im, *_ in items]), self.resolution)
        return pixels, [item[1] for item in items]

    @torch.no_grad()
    def cache_latents(self, vae, batch_size: int = 256, progress=None) -> None:
        """Encode the whole pool once: posterior mean and std per image (the latent cache)."""
        assert self.pool, "latent caching needs data.cache_size > 0"
        stats, captions = [], []
        for lo in range(0, self.pool, batch_size):
            items = [self.dataset[i] for i in range(lo, min(lo + batch_size, self.pool))]
            pixels = _resized(_to_pixels([im for im, *_ in items]), self.resolution)
            pixels = pixels.to(next(vae.parameters()).device)
            dist = vae.encode_dist(pixels.to(next(vae.parameters()).dtype))
            stats.append(torch.stack([dist.mean, dist.std], 1).to("cpu", torch.float16))
            self.image_size = tuple(pixels.shape[-2:])
            captions += [item[1] for item in items]
            if progress:
                progress(len(captions), self.pool)
        self.latents, self.captions = torch.cat(stats), captions

    def cached(self, step: int) -> tuple[torch.Tensor, list[str]]:
        """(B, 2, C, h, w) cached posterior statistics and captions for this step."""
        idx = self.indices(step)
        return self.latents[idx].float(), [self.captions[i] for i in idx]

    def batch(self, step: int) -> TrainBatch:
        """The step's cached latents (after ``cache_latents``) or images; whole, uncropped."""
        if self.latents is not None:
            stats, captions = self.cached(step)
            return TrainBatch(captions, uncropped(*self.image_size, len(captions)), None, stats)
        pixels, captions = self.images(step)
        return TrainBatch(captions, uncropped(*pixels.shape[-2:], len(captions)), pixels)

    def all_captions(self) -> list[str]:
        """Every caption the stage can draw (the cached pool's); the stream has no end."""
        if not self.pool:
            raise ConfigError("data.cache_text with the shapes stream needs data.cache_size > 0")
        return self.captions or [self.dataset[i][1] for i in range(self.pool)]


def batch_latents(parts, batch, g: torch.Generator, device) -> torch.Tensor:
    """A micro-batch's (B, C, h, w) model-space latents: given (teacher samples), drawn from
    the cached posterior (z = mean + std * eps each step), or encoded from its pixels."""
    if batch.latents is not None:
        return batch.latents.to(device)
    if batch.latent_stats is not None:
        stats = batch.latent_stats  # (B, 2, C, h, w)
        z = stats[:, 0] + stats[:, 1] * torch.randn(stats[:, 0].shape, generator=g)
        return parts.vae.scale_latents(z.to(device))
    with torch.no_grad():
        return parts.vae.encode(batch.pixels.to(device), generator=g)
