"""Run a batch: group compatible jobs, shard the batches over processes, save, record, resume.

Batches are a pure function of the job stream: jobs that must share one pipeline call (same size,
sampler, schedule, steps, guidance, clip skip, init image, and number of 75-token text chunks, which
decides the padding of the text context) are gathered per key in file order and emitted every
``batch_size`` jobs. Batch k belongs to process ``k % world``. A re-run rebuilds the same batches
and runs a batch again when any of its images is missing, writing only those: every image is
always made in the same batch as in an uninterrupted single-process run, so the bytes are equal
(each image also draws all its noise from its own seed, see ldm.pipeline). With ``claims``
(ldm.batch.lock) a batch is made only under its claim, after the manifest is read again, so runs
sharing a folder (``--join``) never make an image twice; a batch claimed by another live process is
waited for at the end, and made if that process died.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from ldm.batch import manifest
from ldm.batch.jobs import Job
from ldm.batch.names import image_name, inside
from ldm.errors import LdmError
from ldm.infotext import infotext_from_record, save_png
from ldm.text.cond import Cond
from ldm.text.prompts import encode_prompts, prompt_chunks

if TYPE_CHECKING:  # fcntl: POSIX only, and only runs that share a folder need it
    from ldm.batch.lock import Claims

# parameters one pipeline call shares (the prompt, negative prompt and seed are per image)
SHARED = ("steps", "guidance_scale", "guidance_rescale", "sampler", "schedule", "eta", "height",
          "width", "clip_skip", "init_image", "mask", "strength", "shift",
          "true_cfg_scale")  # fmt: skip
MAX_OPEN_GROUPS = 64  # bounds memory when a file mixes many settings


@dataclass
class Event:
    """What happened to one image (for progress bars): ok, adopted, failed, elsewhere (made by
    another process meanwhile)."""

    job: Job
    name: str
    status: str
    error: str | None = None


@dataclass
class Summary:
    """The outcome of one process's share of a run."""

    total: int = 0  # images of this process
    skipped: int = 0  # already finished by an earlier run
    others: int = 0  # made meanwhile by another process on the folder (--join)
    made: int = 0
    adopted: int = 0  # complete files whose manifest line was lost, recorded now
    failed: int = 0
    seconds: float = 0.0
    encoded: int = 0  # text encodings computed
    reused: int = 0  # text encodings taken from the cache
    failures: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    @property
    def images_per_s(self) -> float:
        return self.made / self.seconds if self.seconds > 0 else 0.0


class TextCache:
    """Each distinct prompt and negative prompt is encoded once (LRU-bounded), per clip skip.

    Its ``encode`` is the pipeline call's ``encode`` hook: texts are encoded one at a time, padded
    to the batch's chunk count, so a text's embedding does not depend on what it was batched with.
    """

    def __init__(self, pipe, capacity: int = 4096):
        self.pipe, self.capacity = pipe, capacity
        self.conds: OrderedDict = OrderedDict()
        self.encoded = self.reused = 0
        self.num_chunks = lru_cache(maxsize=65536)(self._num_chunks)

    def _encoder(self, clip_skip: int):
        return self.pipe.text_encoder(clip_skip)

    def _num_chunks(self, text: str) -> int:
        """75-token chunks of an A1111 prompt (1 without tokenizing when it cannot be more)."""
        encoder = self._encoder(1)
        if len(text.encode("utf-8")) <= encoder.chunk_length and "BREAK" not in text:
            return 1  # a CLIP token covers at least one byte
        return len(prompt_chunks(encoder, text))

    def job_chunks(self, params: dict) -> int:
        """Chunks of the job's text context (cond and uncond are padded to the same count)."""
        n = self.num_chunks(params["prompt"])
        if params["guidance_scale"] > 1.0:
            n = max(n, self.num_chunks(params["negative_prompt"]))
        return n

    def encode(self, prompts: list[str], negatives: list[str], clip_skip: int, guided: bool):
        """(cond, uncond or None) on the pipeline's device, as ``Pipeline.encode_text``."""
        texts = list(prompts) + (list(negatives) if guided else [])
        n = max(self.num_chunks(t) for t in texts)
        both = Cond.cat([self._one(t, clip_skip, n) for t in texts]).lean()
        return (both[: len(prompts)], both[len(prompts) :]) if guided else (both, None)

    def _one(self, text: str, clip_skip: int, num_chunks: int):
        key = (text, clip_skip, num_chunks)
        if key in self.conds:
            self.conds.move_to_end(key)
            self.reused += 1
            return self.conds[key]
        cond = encode_prompts(self._encoder(clip_skip), [text], min_chunks=num_chunks)
        self.conds[key] = cond.to(self.pipe.device, self.pipe.dtype)
        self.encoded += 1
        if len(self.conds) > self.capacity:
            self.conds.popitem(last=False)
        return self.conds[key]


def batches(
    jobs: Iterable[Job], batch_size: int, chunks: Callable[[dict], int]
) -> Iterator[list[Job]]:
    """Group jobs with equal shared settings into batches of ``batch_size``, in stream order."""
    groups: OrderedDict = OrderedDict()
    for job in jobs:
        key = tuple(job.params.get(k) for k in SHARED) + (chunks(job.params),)
        group = groups.setdefault(key, [])
        group.append(job)
        if len(group) == batch_size:
            yield groups.pop(key)
        elif len(groups) > MAX_OPEN_GROUPS:
            yield groups.popitem(last=False)[1]  # the oldest partial batch, deterministically
    yield from groups.values()


def job_name(job: Job) -> str:
    return image_name(job.index, job.params["prompt"], job.params["seed"])


def run_batches(
    pipe,
    jobs: Callable[[], Iterable[Job]],
    outdir: str | Path,
    *,
    batch_size: int = 4,
    rank: int = 0,
    world: int = 1,
    claims: Claims | None = None,
    every_batch: bool = False,
    on_plan: Callable[[int, int], None] | None = None,
    on_image: Callable[[Event], None] | None = None,
) -> Summary:
    """Make this process's images that are not finished yet; ``jobs()`` streams the valid jobs.

    ``on_plan(total, already_done)`` is called once before the first image, ``on_image`` after
    each image. Failures (NaN, out of memory) are recorded in the manifest and the run goes on.
    ``claims``: take each batch's claim first (runs sharing the folder); ``every_batch``: offer
    to make every batch, not only this rank's shard (a process joining another run).
    """
    outdir = Path(outdir)
    cache = TextCache(pipe)
    summary = Summary()

    # 1. which of this process's batches have work (before any image: conflicts stop the run)
    entries = manifest.read(outdir)
    plan: dict[int, list[str]] = {}
    for k, batch in enumerate(batches(jobs(), batch_size, cache.job_chunks)):
        if k % world != rank and not every_batch:
            continue
        states = [
            manifest.status(
                job_name(j),
                j.params,
                inside(outdir, job_name(j)),
                entries.get(job_name(j)),
                pipe.model_hash,
            )  # fmt: skip
            for j in batch
        ]
        summary.total += len(batch)
        summary.skipped += states.count("done")
        if any(s != "done" for s in states):
            plan[k] = states
    del entries
    if on_plan:
        on_plan(summary.total, summary.skipped)

    # 2. run the batches with work, writing only the missing images
    start = time.perf_counter()
    outdir.mkdir(parents=True, exist_ok=True)
    run = _BatchRunner(pipe, cache, outdir, summary, rank, on_image)
    with manifest.Writer(outdir) as run.writer:
        if claims is None:
            for k, batch in enumerate(batches(jobs(), batch_size, cache.job_chunks)):
                if k in plan:
                    run(batch, plan.pop(k))
        else:
            busy = _run_claimed(run, claims, jobs, batch_size, plan, wait=False)
            _run_claimed(run, claims, jobs, batch_size, busy, wait=True)
    summary.seconds = time.perf_counter() - start
    summary.encoded, summary.reused = cache.encoded, cache.reused
    return summary


def _run_claimed(run, claims: Claims, jobs, batch_size: int, plan: dict, wait: bool) -> dict:
    """Make the planned batches whose claim we get; those held by others are returned (with
    ``wait``, each is waited for, then made if its maker died before finishing it)."""
    busy: dict[int, list[str]] = {}
    for k, batch in enumerate(batches(jobs(), batch_size, run.cache.job_chunks) if plan else ()):
        if k not in plan:
            continue
        states = plan.pop(k)
        claim = claims.take(job_name(batch[0]), wait=wait)
        if claim is None:
            busy[k] = states
            continue
        with claim:
            run(batch, run.recheck(batch, states))
        if not plan:
            break
    return busy


class _BatchRunner:
    """Makes one batch's missing images, saving each and appending its manifest line."""

    def __init__(self, pipe, cache, outdir, summary, rank, on_image):
        self.pipe, self.cache, self.outdir, self.summary = pipe, cache, outdir, summary
        self.rank, self.on_image = rank, on_image
        self.tail = manifest.Tail(outdir)
        self.writer: manifest.Writer

    def recheck(self, batch: list[Job], states: list[str]) -> list[str]:
        """The states again, from the manifest as it is now (other processes append to it)."""
        entries = self.tail.update()
        fresh = []
        for job, state in zip(batch, states):
            if state != "done":
                name = job_name(job)
                path = inside(self.outdir, name)
                state = manifest.status(name, job.params, path, entries.get(name),
                                        self.pipe.model_hash)  # fmt: skip
                if state == "done":
                    self.summary.others += 1
                    if self.on_image:
                        self.on_image(Event(job, name, "elsewhere"))
            fresh.append(state)
        return fresh

    def __call__(self, batch: list[Job], states: list[str]) -> None:
        _run_batch(self.pipe, self.cache, batch, states, self.outdir, self.writer, self.summary,
                   self.rank, self.on_image)  # fmt: skip


def _run_batch(pipe, cache, batch, states, outdir, writer, summary, rank, on_image) -> None:
    for job, state in zip(batch, states):
        if state == "adopt":
            name = job_name(job)
            sha = manifest.file_sha256(inside(outdir, name))
            writer.append(_entry(job, name, rank, status="ok", sha256=sha, seconds=None))
            summary.adopted += 1
            if on_image:
                on_image(Event(job, name, "adopted"))
    need = [i for i, s in enumerate(states) if s == "todo"]
    if not need:
        return
    for i, result, seconds in _generate(pipe, cache, batch, need):
        job, name = batch[i], job_name(batch[i])
        if isinstance(result, str):
            writer.append(_entry(job, name, rank, status="failed", error=result, seconds=seconds))
            summary.failed += 1
            summary.failures.append((name, result))
            event = Event(job, name, "failed", result)
        else:
            path = inside(outdir, name)
            _save(result, path)
            sha = manifest.file_sha256(path)  # after the rename: the line follows the file
            writer.append(_entry(job, name, rank, status="ok", sha256=sha, seconds=seconds))
            summary.made += 1
            event = Event(job, name, "ok")
        if on_image:
            on_image(event)


def _generate(
    pipe, cache: TextCache, batch: list[Job], need: list[int]
) -> Iterator[tuple[int, object, float]]:
    """(index in batch, Generated or failure reason, seconds per image) for the needed images.

    The whole batch is always run (its composition decides the bytes); if it fails, each needed
    image is tried alone, as an uninterrupted run would have done.
    """
    try:
        start = time.perf_counter()
        results = _call(pipe, cache, batch)
        seconds = (time.perf_counter() - start) / len(batch)
        yield from ((i, results[i], seconds) for i in need)
        return
    except (LdmError, RuntimeError, ValueError) as e:
        if len(batch) == 1:
            yield need[0], _reason(e), time.perf_counter() - start
            return
    for i in need:
        start = time.perf_counter()
        try:
            result = _call(pipe, cache, [batch[i]])[0]
        except (LdmError, RuntimeError, ValueError) as e:
            result = _reason(e)
        yield i, result, time.perf_counter() - start


def _call(pipe, cache: TextCache, batch: list[Job]) -> list:
    shared = {k: batch[0].params.get(k) for k in SHARED if k in batch[0].params}
    if shared.get("true_cfg_scale") is None:  # unset: the pipeline's (off)
        shared.pop("true_cfg_scale", None)
    return pipe(
        [j.params["prompt"] for j in batch],
        [j.params["seed"] for j in batch],
        negative_prompt=[j.params["negative_prompt"] for j in batch],
        encode=cache.encode,
        **shared,
    )


def _reason(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:500]


def _save(generated, path: Path) -> None:
    save_png(generated.image, path, infotext_from_record(generated.record), generated.record)


def _entry(job: Job, name: str, rank: int, **fields) -> dict:
    return dict(
        name=name, path=name, job=dict(index=job.index, line=job.line, entry=job.entry),
        params=job.params, rank=rank, pid=os.getpid(), **fields,
    )  # fmt: skip
