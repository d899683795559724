"""Deterministic, resumable batches from one aspect-ratio bucket at a time.

The epoch plan is a pure function of (seed, epoch): each bucket's samples are permuted, cut into
global batches (the last one padded by wrapping round the bucket, or dropped), and the batches
are permuted. Batch ``i`` of epoch ``e`` therefore never depends on what ran before it, so
``state_dict() == {"epoch": e, "batch": i, ...}`` is the whole data position. Per-sample crops and
flips draw from a generator seeded by (seed, epoch, batch, position). For DDP each process takes
the slice ``[shard_index * b, (shard_index + 1) * b)`` of every global batch (``b = B / shards``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.data.buckets import BucketManager, Placement
from ldm.data.folders import Sample, Source
from ldm.data.images import (
    DEFAULT_MAX_PIXELS,
    SkipImage,
    cover_size,
    crop_params,
    load_crop,
    probe_size,
)
from ldm.errors import ConfigError, LdmError
from ldm.io import atomic_write_text


class SkipLog:
    """Skipped samples as JSON lines (key, path, reason), rewritten atomically; counts by kind."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.rows: dict[str, dict] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        if self.path is not None and self.path.is_file():  # resumed run: keep earlier entries
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row

    def add(self, sample: Sample, error: SkipImage) -> None:
        with self._lock:
            self.counts[error.kind] += 1
            if sample.key in self.rows:
                return
            self.rows[sample.key] = {"key": sample.key, "path": sample.path, "reason": str(error)}
            if self.path is not None:
                text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows.values())
                atomic_write_text(self.path, text)


def check_caption(caption: str | None) -> str:
    """The caption, stripped; missing or empty captions raise SkipImage."""
    if caption is None:
        raise SkipImage("missing caption: no caption file or field")
    caption = str(caption).strip()
    if not caption:
        raise SkipImage("empty caption: caption is blank")
    return caption


def _probe(sample: Sample, max_pixels: int) -> tuple[int, int]:
    """(W, H) from the header; a file on disk is opened, not read whole."""
    if sample.size is not None:
        return sample.size
    if sample.file is not None:
        try:
            with open(sample.file, "rb") as f:
                return probe_size(f, max_pixels)
        except FileNotFoundError:
            raise SkipImage(f"missing image: {sample.path} does not exist") from None
        except OSError as e:
            raise SkipImage(f"unreadable file: {e}") from None
    return probe_size(_read(sample), max_pixels)


def _read(sample: Sample):
    try:
        return sample.load()
    except FileNotFoundError:
        raise SkipImage(f"missing image: {sample.path} does not exist") from None
    except OSError as e:
        raise SkipImage(f"unreadable file: {e}") from None


@dataclass(frozen=True)
class Entry:
    """A usable sample after the scan: its index in the source, caption, size and bucket."""

    index: int
    caption: str
    size: tuple[int, int]
    placement: Placement


class BatchIterator:
    """Endless iterator of batches ``{"pixels", "captions", "keys", "crops", "epoch", "batch"}``.

    ``pixels`` is (b, 3, H, W) float in [-1, 1]. With a ``latent_cache`` and every sample cached,
    ``latent_mean``/``latent_std`` replace ``pixels``. Epochs roll over by themselves.
    """

    def __init__(
        self,
        source: Source,
        batch_size: int,  # the global batch size, split over num_shards processes
        seed: int = 0,
        resolution: int = 512,  # square crop size when buckets is None
        buckets: BucketManager | None = None,  # aspect-ratio buckets (kohya)
        shuffle: bool = True,  # permute samples and batches each epoch
        random_crop: bool = False,  # random instead of centre crop
        flip: bool = False,  # mirror with probability 0.5
        drop_last: bool = False,  # drop a bucket's partial batch instead of wrapping round
        num_shards: int = 1,  # DDP world size
        shard_index: int = 0,  # DDP rank
        max_pixels: int = DEFAULT_MAX_PIXELS,  # decompression-bomb limit, checked on headers
        skip_log: str | Path | None = None,  # e.g. run_dir / "skipped.jsonl"
        latent_cache: Any = None,  # ldm.data.cache.LatentCache
        prefetch: int = 0,  # batches prepared ahead in a background thread
    ):
        if batch_size <= 0 or num_shards <= 0 or batch_size % num_shards:
            raise ConfigError(
                f"batch_size {batch_size} must be a positive multiple of num_shards {num_shards}"
            )
        if not 0 <= shard_index < num_shards:
            raise ConfigError(f"shard_index {shard_index} not in [0, {num_shards})")
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.resolution, self.buckets, self.shuffle = resolution, buckets, shuffle
        self.random_crop, self.flip, self.drop_last = random_crop, flip, drop_last
        self.num_shards, self.shard_index = num_shards, shard_index
        self.max_pixels, self.latent_cache = max_pixels, latent_cache
        if skip_log is not None and shard_index > 0:  # one file per process: no write races
            skip_log = Path(skip_log).with_suffix(f".rank{shard_index}{Path(skip_log).suffix}")
        self.skips = SkipLog(skip_log)
        self.endless = getattr(source, "endless", False)
        self.entries = [] if self.endless else self._scan()
        self._by_bucket: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
        for n, entry in enumerate(self.entries):
            self._by_bucket[entry.placement.bucket].append(n)
        if not self.endless and not self.entries:
            raise LdmError(f"{source.name}: no usable samples (see the skip list)")
        self.epoch, self.batch = 0, 0
        self._plans: dict[int, list[list[int]]] = {}  # this epoch's and the prefetched next
        self._pending: collections.deque[tuple[int, int, Future]] = collections.deque()
        self._pool = ThreadPoolExecutor(1) if prefetch > 0 else None
        self.prefetch = prefetch

    # -- scan: captions and image headers, once --------------------------------------------
    def _place(self, size: tuple[int, int]) -> Placement:
        if self.buckets is not None:
            placement = self.buckets.select(*size)
            if min(placement.bucket) <= 0:
                raise SkipImage(f"too small: {size[0]}x{size[1]} is below one bucket step")
            return placement
        square = (self.resolution, self.resolution)
        return Placement(square, cover_size(size, square))

    def _scan(self) -> list[Entry]:
        entries = []
        for index in range(len(self.source)):
            sample = self.source[index]
            try:
                caption = check_caption(sample.caption)
                size = _probe(sample, self.max_pixels)
                entries.append(Entry(index, caption, size, self._place(size)))
            except SkipImage as e:
                self.skips.add(sample, e)
        return entries

    # -- the epoch plan --------------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> int | None:
        return None if self.endless else len(self._plan(self.epoch))

    @property
    def bucket_counts(self) -> dict[tuple[int, int], int]:
        return {b: len(members) for b, members in sorted(self._by_bucket.items())}

    @property
    def skipped(self) -> dict[str, int]:
        """Counts of skipped samples by kind (for the training log)."""
        return dict(self.skips.counts)

    def _plan(self, epoch: int) -> list[list[int]]:
        """Global batches of entry numbers for one epoch (pure function of seed and epoch)."""
        if epoch in self._plans:
            return self._plans[epoch]
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for bucket in sorted(self._by_bucket):
            members = np.array(self._by_bucket[bucket])
            if self.shuffle:
                members = rng.permutation(members)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size].tolist()
                if len(chunk) < self.batch_size:
                    if self.drop_last:
                        continue
                    # wrap round the bucket so every batch is full (equal slices for DDP)
                    chunk += [
                        int(members[k % len(members)]) for k in range(self.batch_size - len(chunk))
                    ]
                batches.append(chunk)
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        if not batches:
            raise LdmError(f"{self.source.name}: no bucket holds a full batch of {self.batch_size}")
        self._plans = {e: b for e, b in self._plans.items() if e == epoch - 1} | {epoch: batches}
        return batches

    # -- loading one batch -----------------------------------------------------------------
    def _load_one(self, entry: Entry, sample: Sample, rng: np.random.Generator, cache) -> dict:
        params = crop_params(
            entry.size, entry.placement.bucket, entry.placement.resized,
            self.random_crop, self.flip, rng,
        )  # fmt: skip
        out: dict[str, Any] = {"key": sample.key, "caption": entry.caption, "crop": params}
        cached = cache.get(sample.key, params) if cache is not None else None
        if cached is not None:
            out["latent"] = cached  # (mean, std): no need to decode the image
        else:
            out["pixels"] = load_crop(_read(sample), params, self.max_pixels)
        return out

    def _candidates(self, n: int):
        """Entry n, then the rest of its bucket in order: deterministic stand-ins for failures."""
        members = self._by_bucket[self.entries[n].placement.bucket]
        start = members.index(n)
        return (members[(start + k) % len(members)] for k in range(len(members)))

    def _load_position(self, n: int, rng_seed: list[int], cache) -> dict:
        for m in self._candidates(n):
            entry = self.entries[m]
            sample = self.source[entry.index]
            if sample.key in self.skips.rows:
                continue
            try:
                return self._load_one(entry, sample, np.random.default_rng(rng_seed), cache)
            except SkipImage as e:
                self.skips.add(sample, e)
        raise LdmError(f"{self.source.name}: every image in bucket {entry.placement.bucket} failed")

    def _load_endless(self, index: int, rng_seed: list[int], cache) -> dict:
        for attempt in range(100):  # a failing stream sample is replaced by a far-away index
            sample = self.source[index + attempt * 1_000_000_007]
            try:
                caption = check_caption(sample.caption)
                size = _probe(sample, self.max_pixels)
                entry = Entry(index, caption, size, self._place(size))
                return self._load_one(entry, sample, np.random.default_rng(rng_seed), cache)
            except SkipImage as e:
                self.skips.add(sample, e)
        raise LdmError(f"{self.source.name}: 100 consecutive samples failed at index {index}")

    def _make_batch(self, epoch: int, batch: int, cache: Any = None) -> dict:
        per_shard = self.batch_size // self.num_shards
        positions = range(self.shard_index * per_shard, (self.shard_index + 1) * per_shard)
        if self.endless:
            items = [
                self._load_endless(batch * self.batch_size + j, [self.seed, 0, batch, j], cache)
                for j in positions
            ]
        else:
            plan = self._plan(epoch)[batch]
            seeds = [[self.seed, epoch, batch, j] for j in positions]
            items = [self._load_position(plan[j], s, cache) for j, s in zip(positions, seeds)]
        if cache is not None and not all("latent" in it for it in items):
            return self._make_batch(epoch, batch, cache=None)  # a miss: decode the whole batch
        out: dict[str, Any] = {
            "captions": [it["caption"] for it in items],
            "keys": [it["key"] for it in items],
            "crops": [it["crop"] for it in items],
            "epoch": epoch,
            "batch": batch,
        }
        if cache is not None:
            out["latent_mean"] = torch.stack([it["latent"][0] for it in items])
            out["latent_std"] = torch.stack([it["latent"][1] for it in items])
        else:
            out["pixels"] = torch.stack([it["pixels"] for it in items])  # (b, 3, H, W)
        return out

    def epoch_batches(self, epoch: int = 0):
        """This shard's batches of one epoch, decoded (no latent cache), without moving the
        iterator's position: what ``ldm.data.cache.precompute_latents`` fills a cache from."""
        if self.endless:
            raise LdmError(f"{self.source.name}: an endless source has no epochs to precompute")
        for batch in range(len(self._plan(epoch))):
            yield self._make_batch(epoch, batch, cache=None)

    @property
    def captions(self) -> list[str]:
        """Every usable caption, in scan order (what a text-embedding cache is filled with)."""
        return [e.caption for e in self.entries]

    # -- iteration and state ---------------------------------------------------------------
    def _advance(self, epoch: int, batch: int) -> tuple[int, int]:
        if not self.endless and batch + 1 >= len(self._plan(epoch)):
            return epoch + 1, 0
        return epoch, batch + 1

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict:
        if self._pool is None:
            out = self._make_batch(self.epoch, self.batch, self.latent_cache)
        else:
            pos = (self.epoch, self.batch)
            while len(self._pending) < self.prefetch + 1:  # keep the queue full, in order
                last = self._advance(*self._pending[-1][:2]) if self._pending else pos
                self._pending.append(
                    (*last, self._pool.submit(self._make_batch, *last, self.latent_cache))
                )
            _, _, future = self._pending.popleft()
            out = future.result()
        self.epoch, self.batch = self._advance(self.epoch, self.batch)
        return out

    def fingerprint(self) -> str:
        """Hash of the sample keys and buckets: a resumed run must see the same data."""
        h = hashlib.sha256(f"{self.endless}".encode())  # not the path: data may move
        for e in self.entries:
            h.update(f"{self.source[e.index].key}|{e.placement.bucket}\n".encode())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict:
        """The data position of the next batch (plus what must match on resume)."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        current = self.state_dict()
        for name in ("seed", "batch_size", "fingerprint"):
            mine = current[name]
            if state.get(name) != mine:
                raise LdmError(
                    f"resume: data {name} changed since the checkpoint: {state.get(name)} -> {mine}"
                )
        self.close()
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._pool = ThreadPoolExecutor(1) if self.prefetch > 0 else None

    def close(self) -> None:
        """Stop the prefetch thread (pending batches are discarded)."""
        for *_, future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
