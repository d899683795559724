"""The one thread that owns the loaded model: jobs from a bounded queue, one at a time.

Every protocol (A1111, ComfyUI, OpenAI) turns its request into a :class:`Job` of batches
(prompts + seeds, one pipeline call each) and the same pipeline settings as ``ldm txt2img``;
the worker runs the batches in order with ``Pipeline.__call__`` (image k of a job with seed s gets
seed s + k, as the CLI), saves each image like the CLI (``OutputIndex``) and resolves the job's
future. Interrupt and skip are flags the step callback reads, so a job stops within one step.
"""

from __future__ import annotations

import inspect
import itertools
import queue
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from ldm.errors import LdmError
from ldm.serve.models import ModelTable
from ldm.serve.outputs import OutputImage, OutputIndex


class QueueFull(Exception):
    """The bounded queue has no room: the protocol answers 503."""


class _Stop(Exception):
    """Raised from the step callback to end the current batch (skip) or job (interrupt)."""


PREVIEW_EVERY = 1.0  # seconds between live previews (A1111 /progress current_image)
# on_event(kind, data) from the worker thread: "start", "progress", "batch", "done"
EventListener = Callable[[str, dict], None]


@dataclass
class Job:
    """One request: its batches run in order with the same pipeline settings."""

    batches: list[tuple[list[str], list[int]]]  # (prompts, seeds) per pipeline call
    settings: dict  # Pipeline.__call__ keywords (steps, sampler, height, init_image, ...)
    model: str  # a name in the server's ModelTable
    source: str = "a1111"  # which protocol made it (shown by /queue)
    on_event: EventListener | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    number: int = 0  # position in the server's submission order (ComfyUI's "number")
    future: Future = field(default_factory=Future)
    interrupted: bool = False
    skipped: bool = False  # skip the running batch only
    submitted: float = field(default_factory=time.monotonic)
    extra: dict = field(default_factory=dict)  # what the protocol wants to remember (workflow)

    @property
    def num_images(self) -> int:
        return sum(len(seeds) for _, seeds in self.batches)

    def emit(self, kind: str, **data) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, data)
            except Exception:  # a listener's failure (a closed websocket) never stops the job
                traceback.print_exc()


@dataclass
class JobResult:
    images: list[OutputImage]
    interrupted: bool  # stopped by interrupt (the images made before it are kept)
    seconds: float


@dataclass
class Progress:
    """What the running job is doing (A1111 /progress reads a snapshot of it)."""

    job: Job | None = None
    batch: int = 0  # index of the running batch ("job_no")
    step: int = 0
    num_steps: int = 0
    started: float = 0.0  # monotonic time the job started
    preview: object = None  # PIL preview of the running batch's denoised image, when available


class Worker:
    """Owns the model table; runs one job at a time from a queue of at most ``queue_size``."""

    def __init__(self, models: ModelTable, outputs: OutputIndex, queue_size: int = 8):
        self.models, self.outputs = models, outputs
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._numbers = itertools.count()
        self._lock = threading.Lock()  # guards progress and the pending list
        self.progress = Progress()
        self._thread = threading.Thread(target=self._loop, name="ldm-serve-worker", daemon=True)
        self._stopping = False

    # ---- control (any thread) -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> Job:
        """Queue a job, or raise QueueFull at once (never blocks the event loop)."""
        if self._stopping:
            raise QueueFull("the server is shutting down")
        with self._lock:
            job.number = next(self._numbers)
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(f"the queue is full ({self._queue.maxsize} jobs)") from None
        return job

    def pending(self) -> list[Job]:
        with self._queue.mutex:
            return [j for j in self._queue.queue if j is not None]

    def running(self) -> Job | None:
        return self.progress.job

    def interrupt(self, job_id: str | None = None) -> bool:
        """Stop the running job within a step (A1111 /interrupt, ComfyUI /interrupt)."""
        job = self.progress.job
        if job is not None and (job_id is None or job.id == job_id):
            job.interrupted = True
            return True
        return False

    def skip(self) -> None:
        """Stop the running batch; the job goes on with its next batch (A1111 /skip)."""
        job = self.progress.job
        if job is not None:
            job.skipped = True

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if still queued, else stop it within a step."""
        job.interrupted = True

    def stop_soon(self) -> None:
        """Refuse new jobs, fail the queued ones, interrupt the running one; returns at once
        (Ctrl-C: the waiting requests answer before the server closes their connections)."""
        self._stopping = True
        for job in self._drain():
            job.future.set_exception(QueueFull("the server is shutting down"))
            job.emit("done")
        self.interrupt()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    def stop(self, timeout: float = 30.0) -> None:
        """stop_soon, then wait for the thread to end."""
        self.stop_soon()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _drain(self) -> list[Job]:
        jobs = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    # ---- the worker thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.interrupted:  # cancelled while it waited
                job.future.set_result(JobResult([], True, 0.0))
                job.emit("done")
                continue
            with self._lock:
                self.progress = Progress(job=job, started=time.monotonic())
            job.emit("start")
            result = error = None
            try:
                result = self._run(job)
            except LdmError as e:
                error = e
            except Exception as e:  # a bug must fail this job, not the server
                traceback.print_exc()
                error = RuntimeError(f"{type(e).__name__}: {e}")
            finally:
                # idle before the future resolves: whoever waited on it must not see the job
                # still running (progress / running() read self.progress)
                with self._lock:
                    self.progress = Progress()
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
            job.emit("done")

    def _run(self, job: Job) -> JobResult:
        pipe = self.models.pipeline(job.model)
        images: list[OutputImage] = []
        started = time.monotonic()
        for b, (prompts, seeds) in enumerate(job.batches):
            if job.interrupted:
                break
            job.skipped = False
            self.progress.batch, self.progress.step, self.progress.preview = b, 0, None
            try:
                results = pipe(prompts, seeds, **job.settings, **self._callbacks(pipe, job))
            except _Stop:
                continue  # skipped or interrupted: the loop's check decides which
            for result in results:
                images.append(self.outputs.save(result.image, result.record))
            job.emit("batch", batch=b, images=images[-len(results) :])
        return JobResult(images, job.interrupted, time.monotonic() - started)

    def _callbacks(self, pipe, job: Job) -> dict:
        """The step callback (progress, interrupt, skip) and, where the pipeline offers it, the
        per-step preview of the denoised latents."""

        def on_step(step: int, num_steps: int) -> None:
            self.progress.step, self.progress.num_steps = step, num_steps
            job.emit("progress", value=step, max=num_steps, batch=self.progress.batch)
            if job.interrupted or job.skipped:
                raise _Stop

        last = [0.0]

        def on_preview(step: int, num_steps: int, denoised) -> None:
            # the real VAE, at most every PREVIEW_EVERY seconds (a decode costs a few steps)
            now = time.monotonic()
            if now - last[0] >= PREVIEW_EVERY:
                last[0] = now
                self.progress.preview = pipe.decode(denoised[:1])[0][0]

        out: dict = {"callback": on_step}
        if "preview" in inspect.signature(pipe.__call__).parameters:
            out["preview"] = on_preview
        return out

    def snapshot(self) -> Progress:
        with self._lock:
            p = self.progress
            return Progress(p.job, p.batch, p.step, p.num_steps, p.started, p.preview)
