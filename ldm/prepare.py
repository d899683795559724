"""Step 1 of a pipeline call: the settings a request may carry, their defaults, and the checks.

Unset values come from the model (its family's or stored sampler, steps and guidance, its trained
size; img2img keeps the init image's size); every value is checked before the first tensor is
made, one LdmError per bad value (ldm.request holds the checks). ``Pipeline.prepare`` calls this.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ldm.modes import load_image
from ldm.request import (
    Request,
    check_fraction,
    check_modes,
    check_numbers,
    check_shift,
    check_skip_layers,
    check_true_cfg,
    default_eta,
    packed_size,
    prompt_lists,
    resolve_sampling,
)
from ldm.text.micro import MicroConditioning


def prepare_request(
    pipe,  # ldm.pipeline.Pipeline
    prompts: list[str],
    seeds: list[int],
    *,
    negative_prompt: str | list[str] = "",
    steps: int | None = None,  # None: the model family's default (sampling_defaults)
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    sampler: str | None = None,
    schedule: str | None = None,
    eta: float | None = None,  # None: the sampler's own default
    height: int | None = None,
    width: int | None = None,
    init_image: Image.Image | str | Path | None = None,
    strength: float = 0.8,
    mask: Image.Image | str | Path | None = None,
    clip_skip: int = 1,
    batched_guidance: bool = True,
    micro: MicroConditioning | None = None,  # SDXL size/crop/aesthetic conditioning
    denoising_start: float | None = None,  # start part-way (a refiner after its base)
    denoising_end: float | None = None,  # stop part-way (a base before its refiner)
    skip_layers: list[int] | tuple[int, ...] = (),  # SD3.5 skip-layer guidance blocks
    skip_layer_scale: float = 2.8,
    skip_layer_start: float = 0.01,
    skip_layer_stop: float = 0.2,
    shift: float | None = None,  # flow models: the static shift (None: the checkpoint's)
    true_cfg_scale: float = 1.0,  # FLUX.1-dev: CFG over the embedded guidance (2 passes)
) -> Request:
    """Settings -> a checked Request: unset values from the model (its family's sampler, steps,
    guidance and size; an init image's own size), every value checked before any work."""
    spec, schedule, steps, guidance_scale = resolve_sampling(
        pipe.sampling_defaults, sampler, schedule, steps, guidance_scale
    )
    prompts, negatives = prompt_lists(prompts, seeds, negative_prompt)
    if isinstance(init_image, (str, Path)):
        init_image = load_image(init_image, "--init-image")
    if isinstance(mask, (str, Path)):
        mask = load_image(mask, "--mask")
    if init_image is not None and (height is None or width is None):
        # img2img keeps the init image's size (rounded down to the latent grid)
        f = pipe.factor
        height = init_image.height // f * f if height is None else height
        width = init_image.width // f * f if width is None else width
    height = pipe.default_size[0] if height is None else height
    width = pipe.default_size[1] if width is None else width
    if pipe.parts.family.latent_patch > 1:  # FLUX: down to 16 px multiples, as diffusers
        height, width = packed_size(height, width, pipe.factor * pipe.parts.family.latent_patch)
    check_numbers(steps, guidance_scale, guidance_rescale, eta, height, width, pipe.factor)
    check_modes(strength, clip_skip, init_image, mask, pipe.is_inpainting_model)
    check_fraction("--denoising-start", denoising_start)
    check_fraction("--denoising-end", denoising_end)
    if eta is None:  # the model's stored one with its own sampler, else the sampler's default
        eta = default_eta(pipe.sampling_defaults, spec)
    mode = "txt2img" if init_image is None else ("inpaint" if mask is not None else "img2img")
    check_skip_layers(skip_layers, skip_layer_start, skip_layer_stop, pipe.unet)
    shift = check_shift(shift, pipe.parts.scheduler_config, flow=pipe.schedule is None)
    return Request(
        prompts, negatives, [int(s) for s in seeds], spec, schedule, steps, guidance_scale,
        guidance_rescale, eta, height, width, clip_skip, mode, init_image, mask, strength,
        batched_guidance, micro or MicroConditioning(), denoising_start, denoising_end,
        tuple(skip_layers), skip_layer_scale, skip_layer_start, skip_layer_stop, shift,
        check_true_cfg(true_cfg_scale, pipe.guidance_embedded),
    )  # fmt: skip
