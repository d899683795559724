"""SDXL's ensemble of experts (Podell et al. 2023, Sec. 2.5): a base model denoises the first
part of the schedule, a refiner model the rest, continuing from the base's latents.

The hand-off is diffusers' ``denoising_end`` / ``denoising_start`` (and A1111's "Refiner switch
at"): both models walk the same sigmas (they share the noise schedule), the base stops where the
timestep falls below (1 - switch_at) * T, and the refiner starts there without new noise.
Per-image generators carry on from the base into the refiner, as diffusers' recipe passes one
generator to both calls.
"""

from __future__ import annotations

import torch

from ldm.errors import LdmError
from ldm.pipeline import Generated, Pipeline, StepCallback


def generate_with_refiner(
    base: Pipeline,
    refiner: Pipeline,
    prompts: list[str],
    seeds: list[int],
    *,
    switch_at: float = 0.8,  # share of the noise the base removes (A1111 "Refiner switch at")
    callback: StepCallback | None = None,
    **settings,  # Pipeline.prepare's; both models use the same sampler, steps and guidance
) -> list[Generated]:
    """Images from ``base`` handed to ``refiner`` at ``switch_at``; records name both models."""
    if settings.get("init_image") is not None or settings.get("mask") is not None:
        raise LdmError("--refiner works with txt2img (no --init-image / --mask)")
    if base.vae.latent_channels != refiner.vae.latent_channels:
        raise LdmError("--refiner: the two models' latent spaces differ")
    first = base.prepare(prompts, seeds, denoising_end=switch_at, **settings)
    settings = dict(settings, height=first.height, width=first.width)
    second = refiner.prepare(prompts, seeds, denoising_start=switch_at, **settings)
    total = first.steps

    def progress(offset: int):
        if callback is None:
            return None
        return lambda step, num_steps: callback(min(offset + step, total), total)

    generators = [torch.Generator("cpu").manual_seed(s) for s in first.seeds]
    latents = None
    for pipe, request in ((base, first), (refiner, second)):
        pipe.accelerate()
        guided = pipe.two_pass(request)
        cond, uncond = pipe.encode_text(
            request.prompts, request.negatives, request.clip_skip, guided
        )
        cond, uncond = pipe.condition(request, cond, uncond)
        offset = 0 if latents is None else total - _steps_left(refiner, request)
        latents = pipe.denoise(
            request, cond, uncond, progress(offset), generators=generators, start_latents=latents
        )
    images, retried = refiner.decode(latents)
    out = []
    for i, image in enumerate(images):
        record = base.record(first, i, retried[i])
        path = str(refiner.model_path) if refiner.model_path else None
        record.update(refiner=refiner.model_name, refiner_hash=refiner.model_hash,
                      refiner_switch_at=switch_at, refiner_path=path)  # fmt: skip
        out.append(Generated(image, record))
    return out


def _steps_left(pipe: Pipeline, request) -> int:
    """Steps the refiner runs (for a progress bar that counts both models' steps as one)."""
    from ldm.sampling.plan import make_denoiser, request_sigmas

    denoiser = make_denoiser(pipe.unet, pipe.schedule, request)
    sigmas = request_sigmas(request, denoiser, pipe.schedule, pipe.parts.scheduler_config)
    return len(sigmas) - 1
