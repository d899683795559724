"""Image-caption folders (imagefolder, kohya sidecars, CSV, webdataset shards) as step-indexed
batches for the trainer, on top of ldm.data.loader.BatchIterator."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.data.buckets import BucketManager
from ldm.data.folders import open_source
from ldm.data.loader import BatchIterator
from ldm.errors import LdmError
from ldm.train.config import DataConfig


class FolderBatches:
    """``images(step)`` for step = 0, 1, 2, ... in order; a resumed run seeks to its step."""

    def __init__(self, data: DataConfig, batch_size: int, seed: int, rank: int, world: int,
                 run_dir: Path | None = None):  # fmt: skip
        source = open_source(data.source)
        buckets = None
        if data.buckets:
            lo, hi = max(64, data.resolution // 2), data.resolution * 2
            buckets = BucketManager(data.resolution, lo, hi, no_upscale=data.bucket_no_upscale)
        skip_log = None
        if run_dir is not None:
            skip_log = Path(run_dir) / (
                "skipped.jsonl" if rank == 0 else f"skipped.rank{rank}.jsonl"
            )
        self.iterator = BatchIterator(
            source, batch_size * world, seed=seed, resolution=data.resolution, buckets=buckets,
            random_crop=not data.center_crop, flip=data.random_flip, num_shards=world,
            shard_index=rank, max_pixels=data.max_image_pixels, skip_log=skip_log,
        )  # fmt: skip
        if self.iterator.batches_per_epoch == 0:
            raise LdmError(f"{data.source}: no usable image-caption pairs")
        self.next_step = 0
        self.latents = None

    @property
    def skipped(self) -> dict:
        return dict(self.iterator.skipped)

    def images(self, step: int) -> tuple[torch.Tensor, list[str]]:
        if step != self.next_step:  # resume (or a validation peek): seek to the step's batch
            state = self.iterator.state_dict()
            per_epoch = self.iterator.batches_per_epoch
            state["epoch"], state["batch"] = divmod(step, per_epoch)
            self.iterator.load_state_dict(state)
        batch = next(self.iterator)
        self.next_step = step + 1
        return batch["pixels"], batch["captions"]

    def cached(self, step: int):
        raise LdmError(
            "latent caching of folder datasets is not supported yet; set cache_latents: false"
        )

    def cache_latents(self, vae) -> None:
        raise LdmError(
            "latent caching of folder datasets is not supported yet; set cache_latents: false"
        )
