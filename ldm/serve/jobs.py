"""What every protocol shares: seeds and batches, early checks, images in, waiting for a job.

A request becomes ``Pipeline.__call__`` settings exactly as ``ldm txt2img`` builds them (unset
values take the model family's defaults), checked by ``Pipeline.prepare`` and the server's limits
before it is queued, so a bad request costs no queue slot and no allocation.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import secrets

from PIL import Image, ImageOps

from ldm.errors import LdmError
from ldm.serve.config import LimitError, Limits
from ldm.serve.worker import Job, JobResult, Worker

SEED_RANGE = 2**32  # random seeds, as ldm txt2img draws them


def seeds_for(seed: int | None) -> int:
    """-1 or None -> a random seed (reported back); others must be in [0, 2**32)."""
    if seed is None or seed == -1:
        return secrets.randbelow(SEED_RANGE)
    if not 0 <= seed < 2**63:
        raise LdmError(f"seed must be -1 (random) or in [0, 2**63), got {seed}")
    return int(seed)


def batches(prompt: str, seed: int, batch_size: int, count: int, negative: str = ""):
    """``count`` pipeline calls of ``batch_size`` images; image k gets seed + k (as the CLI)."""
    return [
        ([prompt] * batch_size, [seed + i * batch_size + j for j in range(batch_size)])
        for i in range(count)
    ]


def check_early(job: Job, worker: Worker, limits: Limits) -> None:
    """Limits, then the pipeline's own checks (when the job's model is the loaded one)."""
    s = job.settings
    limits.check(width=s.get("width"), height=s.get("height"), steps=s.get("steps"),
                 batch=max(len(seeds) for _, seeds in job.batches), count=len(job.batches),
                 prompts=[job.batches[0][0][0], s.get("negative_prompt")])  # fmt: skip
    pipe = worker.models.loaded(job.model)
    if pipe is not None:
        prompts, seeds = job.batches[0]
        r = pipe.prepare(prompts, seeds, **s)  # raises LdmError naming the bad value
        limits.check(width=r.width, height=r.height)  # the model's default size or the image's


def settings(
    *, negative_prompt="", steps=None, guidance_scale=None, sampler=None, schedule=None,
    eta=None, width=None, height=None, clip_skip=None, init_image=None, mask=None, strength=None,
) -> dict:  # fmt: skip
    """Pipeline keywords from protocol values; None means the pipeline's (family's) default."""
    out = dict(negative_prompt=negative_prompt or "", steps=steps, guidance_scale=guidance_scale,
               sampler=sampler, schedule=schedule, height=height, width=width)  # fmt: skip
    if sampler is not None and eta is not None:
        from ldm.sampling.samplers import sampler_spec

        if sampler_spec(sampler).eta is not None:  # a sampler without eta ignores it (A1111)
            out["eta"] = float(eta)
    if clip_skip is not None:
        out["clip_skip"] = int(clip_skip)
    if init_image is not None:
        out["init_image"] = init_image
        out["strength"] = 0.75 if strength is None else float(strength)
    if mask is not None:
        out["mask"] = mask
    return out


def decode_image(data: str, limits: Limits, what: str) -> Image.Image:
    """Base64 (with or without a ``data:`` prefix) -> a loaded PIL image, size-checked first."""
    if not isinstance(data, str) or not data:
        raise LdmError(f"{what}: expected a base64 image")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise LdmError(f"{what}: not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        w, h = image.size  # from the header, before any pixel is decoded
        if w * h > limits.max_pixels or max(w, h) > limits.max_side:
            raise LimitError(
                f"{what} is {w}x{h}: over the server's limit of {limits.max_pixels} "
                f"pixels / {limits.max_side} a side (--max-pixels, --max-size)"
            )
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise LdmError(f"{what}: cannot read the image ({type(e).__name__}: {e})") from None


async def run_job(worker: Worker, job: Job, request=None) -> JobResult:
    """Queue ``job`` (QueueFull when there is no room) and wait for it; a client that goes
    away cancels its job, so a disconnect frees the worker within a step."""
    worker.submit(job)
    future = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.25)
        if done:
            return future.result()
        if request is not None and await request.is_disconnected():
            worker.cancel(job)
            return await future
