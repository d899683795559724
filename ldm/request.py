"""A generation request's settings, checked before any work: one clear error per bad value.

The messages name the CLI flag (``--steps``, ``--guidance-scale``), since that is how most
users set them; the Python API raises the same LdmError.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from PIL import Image

from ldm.errors import LdmError
from ldm.sampling.samplers import SPEC, SamplerSpec, resolve_sampler
from ldm.sampling.schedules import SIGMA_SCHEDULES
from ldm.text.micro import MicroConditioning


@dataclass
class Request:
    """A checked request: what ``Pipeline.prepare`` decided, read by the later steps."""

    prompts: list[str]
    negatives: list[str]  # one per prompt
    seeds: list[int]  # one per prompt; image i draws all its noise from seeds[i]
    spec: SamplerSpec  # the sampler (ldm.sampling.samplers table entry)
    schedule: str  # sigma schedule name (a "DPM++ 2M Karras" alias already applied)
    steps: int
    guidance_scale: float
    guidance_rescale: float
    eta: float | None  # the sampler's default filled in (None: the sampler takes none)
    height: int  # pixels
    width: int
    clip_skip: int
    mode: str  # txt2img | img2img | inpaint
    init_image: Image.Image | None
    mask: Image.Image | None  # white = repaint
    strength: float  # share of the schedule run from the init image
    batched_guidance: bool  # cond and uncond in one network call
    micro: MicroConditioning = field(default_factory=MicroConditioning)  # SDXL size/crop ids
    # run only part of the schedule (diffusers' SDXL base + refiner hand-off): a fraction of
    # the training timesteps, 0.8 = stop (end) or start where 80 % of the noise is removed
    denoising_start: float | None = None
    denoising_end: float | None = None
    # SD3.5's skip-layer guidance: blocks left out of a third pass, its scale, and the share of
    # the steps it runs in (diffusers' skip_guidance_layers / _scale / _start / _stop)
    skip_layers: tuple[int, ...] = ()
    skip_layer_scale: float = 2.8
    skip_layer_start: float = 0.01
    skip_layer_stop: float = 0.2
    shift: float | None = None  # flow models: the static time shift (None: not a flow model)
    # FLUX.1-dev's "true CFG" (diffusers' true_cfg_scale): classifier-free guidance with the
    # negative prompt on top of the embedded guidance scale; 1: off (one pass per step)
    true_cfg_scale: float = 1.0

    @property
    def start_from_image(self) -> bool:
        return self.init_image is not None and self.strength < 1.0

    def settings(self, micro: bool = False) -> dict:
        """The settings every image of the request shares, as its JSON record names them."""
        out = dict(
            sampler=self.spec.name, schedule=self.schedule, steps=self.steps,
            guidance_scale=self.guidance_scale, guidance_rescale=self.guidance_rescale,
            eta=self.eta, width=self.width, height=self.height, clip_skip=self.clip_skip,
            mode=self.mode,
        )  # fmt: skip
        if self.init_image is not None:
            out["strength"] = self.strength
        if self.shift is not None:
            out["shift"] = self.shift
        if self.true_cfg_scale != 1.0:
            out["true_cfg_scale"] = self.true_cfg_scale
        if self.skip_layers:
            out.update(skip_layers=list(self.skip_layers), skip_layer_scale=self.skip_layer_scale,
                       skip_layer_start=self.skip_layer_start,
                       skip_layer_stop=self.skip_layer_stop)  # fmt: skip
        if micro:  # SDXL families: the size/crop/aesthetic conditioning
            out["micro_conditioning"] = dataclasses.asdict(self.micro)
        return out


def prompt_lists(prompts, seeds, negative_prompt) -> tuple[list[str], list[str]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts, seeds = list(prompts), list(seeds)
    if not prompts or len(prompts) != len(seeds):
        raise LdmError(f"need one seed per prompt, got {len(prompts)} prompts, {len(seeds)} seeds")
    if isinstance(negative_prompt, str) or negative_prompt is None:
        negatives = [negative_prompt or ""] * len(prompts)
    else:
        negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise LdmError(f"need one negative prompt per prompt, got {len(negatives)}")
    return prompts, negatives


def check_sampler(sampler: str, schedule: str) -> tuple[SamplerSpec, str]:
    """Sampler name or A1111 alias + schedule -> (SamplerSpec, schedule name), checked.

    A name that implies a schedule ("DPM++ 2M Karras") beats the "default" schedule.
    """
    name, implied = resolve_sampler(sampler)
    if implied and schedule == "default":
        schedule = implied
    return SPEC[name], check_schedule(schedule)


def check_schedule(schedule: str) -> str:
    if schedule not in SIGMA_SCHEDULES:
        raise LdmError(
            f"--schedule {schedule!r} is unknown; choose from {', '.join(SIGMA_SCHEDULES)}"
        )
    return schedule


def check_numbers(steps, scale, rescale, eta, height, width, factor) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise LdmError(f"--steps must be an integer >= 1, got {steps}")
    if not math.isfinite(scale):
        raise LdmError(f"--guidance-scale must be a finite number, got {scale}")
    if not (math.isfinite(rescale) and 0.0 <= rescale <= 1.0):
        raise LdmError(f"--guidance-rescale must be in [0, 1], got {rescale}")
    if eta is not None and not (math.isfinite(eta) and eta >= 0):
        raise LdmError(f"--eta must be >= 0, got {eta}")
    for flag, size in (("--height", height), ("--width", width)):
        if not isinstance(size, int) or size <= 0:
            raise LdmError(f"{flag} must be a positive integer, got {size}")
        if size % factor:
            raise LdmError(f"{flag} {size} is not a multiple of {factor} (the VAE's latent factor)")


def check_fraction(flag: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and 0.0 < value < 1.0):
        raise LdmError(f"{flag} must be between 0 and 1 (exclusive), got {value}")


def check_modes(strength, clip_skip, init_image, mask, inpainting_model) -> None:
    if not (math.isfinite(strength) and 0.0 < strength <= 1.0):
        raise LdmError(f"--strength must be in (0, 1], got {strength}")
    if not isinstance(clip_skip, int) or clip_skip < 1:
        raise LdmError(f"--clip-skip must be an integer >= 1, got {clip_skip}")
    if mask is not None and init_image is None:
        raise LdmError("--mask needs --init-image (the image to inpaint)")
    if inpainting_model and mask is None:
        raise LdmError("this is a 9-channel inpainting model: it needs --init-image and --mask")


def check_skip_layers(layers, start: float, stop: float, network) -> None:
    """Skip-layer guidance needs a transformer whose blocks can be left out, and valid blocks."""
    if not layers:
        return
    blocks = getattr(network.config, "num_layers", None)
    if blocks is None or not hasattr(network, "transformer_blocks"):
        raise LdmError("--skip-layers needs a transformer model (SD3.5)")
    bad = [i for i in layers if not 0 <= int(i) < blocks]
    if bad:
        raise LdmError(f"--skip-layers {bad}: the model's blocks are 0..{blocks - 1}")
    if not 0 <= start < stop <= 1:
        raise LdmError(
            f"--skip-layer-start/--skip-layer-stop must satisfy 0 <= {start} < {stop} <= 1"
        )


def resolve_sampling(model: dict, sampler, schedule, steps, guidance_scale):
    """(spec, schedule, steps, guidance scale): what is given, else the model's defaults
    (``Family.sampling_defaults``); a sampler other than the model's first brings its own (a
    few-step sampler's steps, guidance off, its schedule) from the sampler table."""
    if sampler is None:  # the model's sampler comes with its schedule
        sampler, schedule = model["sampler"], schedule or model["schedule"]
    spec, _ = check_sampler(sampler, "default")
    own = dict(spec.defaults) if spec.name != model["sampler"] else {}
    fill = {**model, **own}
    spec, schedule = check_sampler(sampler, schedule or own.get("schedule", "default"))
    steps = fill["steps"] if steps is None else steps
    guidance_scale = fill["guidance_scale"] if guidance_scale is None else guidance_scale
    return spec, schedule, steps, guidance_scale


def check_stored_eta(eta, spec: SamplerSpec | None) -> None:
    """A model's stored eta (a TCD student's gamma): a number >= 0 stored beside a sampler
    that takes one (``spec``: that sampler, None when none is stored)."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < math.inf:
        raise LdmError(f"eta must be a number >= 0, got {eta!r}")
    if spec is None or spec.eta is None:
        raise LdmError("eta needs a sampler that takes one (ddim, tcd, the ancestral and SDE "
                       f"ones) stored beside it, not {spec.name if spec else 'none'}")  # fmt: skip


def default_eta(model: dict, spec) -> float | None:
    """The eta a request leaves unset: the model's stored one when it samples with the model's
    own sampler (a TCD student's gamma), else the sampler's own (ancestral and SDE 1, DDIM 0)."""
    stored = model.get("eta")
    if stored is not None and spec.eta is not None:
        own, _ = check_sampler(model["sampler"], "default")  # a stored A1111 label too
        if own.name == spec.name:
            return float(stored)
    return spec.eta


def packed_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """A FLUX image size: each side down to a multiple of 2x2 latent patches (16 px), as
    diffusers' FluxPipeline rounds it."""
    for flag, size in (("--height", height), ("--width", width)):
        if not isinstance(size, int) or size < multiple:
            raise LdmError(f"{flag} must be an integer >= {multiple} for this model, got {size}")
    return height // multiple * multiple, width // multiple * multiple


def check_true_cfg(scale: float, guidance_embedded: bool) -> float:
    """True CFG's scale: a finite number, for a model that embeds its guidance scale."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise LdmError(f"--true-cfg-scale must be a finite number, got {scale}")
    if scale != 1.0 and not guidance_embedded:
        raise LdmError("--true-cfg-scale applies to guidance-distilled models (FLUX.1-dev); "
                       "use --guidance-scale")  # fmt: skip
    return float(scale)


def check_shift(shift: float | None, scheduler_config: dict, flow: bool) -> float | None:
    """A flow model's static shift (the checkpoint's when not given); others take none."""
    if not flow:
        if shift is not None:
            raise LdmError("--shift applies to flow models (SD3, FLUX)")
        return None
    if scheduler_config.get("use_dynamic_shifting"):  # FLUX.1-dev: mu from the image size
        if shift is not None:
            raise LdmError("--shift: this model shifts its schedule by image size (FLUX.1-dev)")
        return None
    shift = float(scheduler_config.get("shift", 1.0)) if shift is None else float(shift)
    if not (math.isfinite(shift) and shift > 0):
        raise LdmError(f"--shift must be a positive number, got {shift}")
    return shift
