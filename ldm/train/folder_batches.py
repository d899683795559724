"""Image-caption folders (imagefolder, kohya sidecars, CSV, webdataset shards) as step-indexed
batches for the trainer, on top of ldm.data.loader.BatchIterator, with an optional on-disk
latent cache (ldm.data.cache.LatentCache) in the run folder."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.data.buckets import BucketManager
from ldm.data.cache import LatentCache, module_hash, precompute_latents
from ldm.data.folders import open_source
from ldm.data.loader import BatchIterator
from ldm.errors import ConfigError, LdmError
from ldm.train.batches import TrainBatch
from ldm.train.config import DataConfig


def bucket_manager(data: DataConfig) -> BucketManager | None:
    """kohya's buckets: sides in bucket_steps between bucket_min and bucket_max, area <= res²."""
    if not data.buckets:
        return None
    lo = data.bucket_min or max(data.bucket_steps, data.resolution // 2)
    hi = data.bucket_max or data.resolution * 2
    return BucketManager(data.resolution, lo, hi, steps=data.bucket_steps,
                         no_upscale=data.bucket_no_upscale)  # fmt: skip


class FolderBatches:
    """``batch(step)`` for step = 0, 1, 2, ... in order; a resumed run seeks to its step."""

    def __init__(self, data: DataConfig, batch_size: int, seed: int, rank: int, world: int,
                 run_dir: Path | None = None):  # fmt: skip
        source = open_source(data.source)
        skip_log = None
        if run_dir is not None:
            skip_log = Path(run_dir) / (
                "skipped.jsonl" if rank == 0 else f"skipped.rank{rank}.jsonl"
            )
        self.config = data
        self.iterator = BatchIterator(
            source, batch_size * world, seed=seed, resolution=data.resolution,
            buckets=bucket_manager(data), random_crop=not data.center_crop,
            flip=data.random_flip, num_shards=world, shard_index=rank,
            max_pixels=data.max_image_pixels, skip_log=skip_log,
        )  # fmt: skip
        if self.iterator.batches_per_epoch == 0:
            raise LdmError(f"{data.source}: no usable image-caption pairs")
        self.next_step = 0
        self.latents = None  # the in-memory pool of the shapes world; folders cache on disk

    @property
    def skipped(self) -> dict:
        return dict(self.iterator.skipped)

    def _next(self, step: int) -> dict:
        if step != self.next_step:  # resume (or a validation peek): seek to the step's batch
            state = self.iterator.state_dict()
            per_epoch = self.iterator.batches_per_epoch
            state["epoch"], state["batch"] = divmod(step, per_epoch)
            self.iterator.load_state_dict(state)
        batch = next(self.iterator)
        self.next_step = step + 1
        return batch

    def batch(self, step: int) -> TrainBatch:
        """Pixels (or cached latent statistics, when every sample hit) and each crop's sizes."""
        b = self._next(step)
        sizes = [crop.size_conditioning() for crop in b["crops"]]
        if "latent_mean" in b:
            stats = torch.stack([b["latent_mean"], b["latent_std"]], 1)  # (B, 2, C, h, w)
            return TrainBatch(b["captions"], sizes, latent_stats=stats)
        return TrainBatch(b["captions"], sizes, pixels=b["pixels"])

    def images(self, step: int) -> tuple[torch.Tensor, list[str]]:
        """(pixels, captions) of a step (VAE stages and their checks, which never cache)."""
        b = self._next(step)
        if "pixels" not in b:
            raise LdmError("this stage reads cached latents, not images")
        return b["pixels"], b["captions"]

    def all_captions(self) -> list[str]:
        return self.iterator.captions

    @torch.no_grad()
    def cache_latents(self, vae, cache_dir: Path) -> int:
        """Encode this shard's first epoch into ``cache_dir`` (both flips), then read from it.

        Returns the number of entries written (0 when all were on disk already). With several
        processes each writes its own shard; the caller waits for all before training, since
        later epochs mix the shards.
        """
        if not self.config.center_crop:
            # a random crop is drawn anew each epoch, so a cached one would freeze it (kohya
            # refuses random_crop with cache_latents for the same reason)
            raise ConfigError("data.cache_latents: needs data.center_crop: true")
        param = next(vae.parameters())
        cache = LatentCache(Path(cache_dir), module_hash(vae))

        def encode_dist(pixels: torch.Tensor):
            dist = vae.encode_dist(pixels.to(param.device, param.dtype))
            return dist.mean, dist.std

        written = precompute_latents(self.iterator.epoch_batches(0), cache, encode_dist)
        self.iterator.latent_cache = cache
        return written

    def cached(self, step: int):
        raise LdmError("folder datasets read their latent cache through batch(step)")
