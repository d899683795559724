"""Text-to-image: load -> encode text -> seeded noise -> sigmas -> guided sampler -> decode.

The call reads top to bottom as the data flow of latent diffusion (Rombach et al. 2022): text
becomes a Cond, per-image CPU generators draw the initial latents, a Denoiser adapter turns the
U-Net into a sigma-space denoiser, classifier-free guidance wraps it, a sampler walks the sigmas,
and the VAE decodes. img2img, inpainting and outpainting only change the starting latents and
wrap the denoiser (see :mod:`ldm.modes`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ldm import __version__
from ldm.accel import ENV_VAR as ACCEL_ENV
from ldm.accel import apply as apply_accel
from ldm.dtypes import DTYPE_NAMES
from ldm.errors import LdmError
from ldm.formats.lora import apply_lora
from ldm.guidance import cfg
from ldm.loading import (
    DEFAULT_MODEL,
    load_model,
    lora_record,
    model_hash,
    resolve_device,
    resolve_dtype,
)
from ldm.modes import blend_known, encode_each, image_to_tensor, inpaint_inputs
from ldm.offload import check_offload, enable_offload
from ldm.pixels import PixelSide
from ldm.prepare import prepare_request
from ldm.request import Request
from ldm.sampling.noise import make_noise
from ldm.sampling.plan import (
    first_latents,
    make_denoiser,
    noise_schedule,
    request_sigmas,
    sampler_options,
    skip_layer_guidance,
)
from ldm.sampling.watch import PreviewCallback, Progress, StepCallback, nan_guard
from ldm.text.encoders import TextEncoder, sequence_length, text_encoder_for
from ldm.text.micro import with_time_ids, zero_rows
from ldm.text.prompts import encode_cond_uncond, encode_prompts

# encode(prompts, negatives, clip_skip, guided) -> (cond, uncond or None), as Pipeline.encode_text
EncodeText = Callable[[list[str], list[str], int, bool], tuple]


@dataclass
class Generated:
    """One generated image and the record of everything needed to make it again."""

    image: Image.Image
    record: dict = field(default_factory=dict)


def load_pipeline(
    model: str | Path | None = None,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    accel: str | None = None,
    t5: bool = True,
    offload: str | None = None,
) -> Pipeline:
    """Load a model (None = the bundled demo model) onto ``device`` in ``dtype``; ``t5=False``
    leaves an SD3 model's T5-XXL unread (zeros in its place, as diffusers without it).

    ``accel`` is the ``ldm.accel`` mode applied before the first image (None: $LDM_ACCEL, else
    auto); see :meth:`Pipeline.accelerate`. ``offload`` ("model", "sequential"; GPUs only):
    the weights are read into CPU RAM and visit the device only while they run (ldm.offload).
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    offload = check_offload(offload, device)
    if model is None:
        model = DEFAULT_MODEL
        if not (DEFAULT_MODEL / "model_index.json").exists():  # a broken install, not a user error
            raise LdmError(f"the bundled demo model is missing ({DEFAULT_MODEL}): reinstall ldm "
                           "or pass --model")  # fmt: skip
    parts = load_model(model, "cpu" if offload != "none" else device, torch_dtype, t5=t5)
    pipe = Pipeline(parts, device, torch_dtype, accel)
    if offload != "none":
        pipe.enable_offload(offload)
    return pipe


class Pipeline(PixelSide):
    """A loaded model and the call that turns prompts + seeds into images with records
    (decoding and the VAE's dtype: :class:`ldm.pixels.PixelSide`)."""

    def __init__(self, parts, device: torch.device, dtype: torch.dtype, accel: str | None = None):
        self.parts = parts
        self.unet = parts.unet.eval().requires_grad_(False)
        self.vae = parts.vae.eval().requires_grad_(False)
        for _, model, _ in parts.text_modules():
            model.eval().requires_grad_(False)
        self._text_encoders: dict[tuple, TextEncoder] = {}  # per clip skip and T5 length
        # T5 tokens of the context (1..512): stored with the model, else its family's (SD3 256, ...)
        self.max_sequence_length = sequence_length(parts)
        self.schedule = noise_schedule(parts.scheduler_config)  # None: a flow model
        self.device, self.dtype = device, dtype
        self.model_path = Path(parts.path) if parts.path is not None else None
        self.model_name = parts.name or "model"
        self._hash: str | None = None
        self._vae_fp32 = None  # lazily made fp32 copy for NaN retries
        self.loras: list[dict] = list(parts.loras)  # LoRAs merged into the weights (records)
        self.accel_mode = accel  # ldm.accel mode to apply (None: $LDM_ACCEL, else auto)
        self.accel = None  # its ldm.accel.Decision once applied (at the first call)
        self.offload = None  # ldm.offload.Offload: parts kept in CPU RAM between their runs

    # ---- properties -------------------------------------------------------------------------
    @property
    def model_hash(self) -> str:
        """First 10 hex of the weights' sha256 (A1111's "Model hash"), computed once."""
        if self._hash is None:
            self._hash = model_hash(self.model_path) if self.model_path else "unsaved"
        return self._hash

    @property
    def factor(self) -> int:
        return int(self.vae.factor)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) the model was trained at: U-Net sample size x VAE factor."""
        size = getattr(self.unet.config, "sample_size", None) or self.parts.family.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return h * self.factor, w * self.factor

    def image_seq_len(self, r: Request) -> int:
        """Image tokens of a transformer at the request's size (flow models' dynamic shift)."""
        patch = getattr(self.unet.config, "patch_size", None) or 1
        patch *= self.parts.family.latent_patch  # FLUX: a token is a 2x2 patch of latents
        return (r.height // self.factor // patch) * (r.width // self.factor // patch)

    @property
    def is_inpainting_model(self) -> bool:
        return self.unet.config.in_channels == 9

    @property
    def sampling_defaults(self) -> dict:
        """The model's sampler, schedule, steps and guidance (``Family.sampling_defaults``)."""
        return self.parts.family.sampling_defaults(self.parts.scheduler_config, self.parts.defaults)

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL base: an empty negative prompt is zero context and pooled, not encoded text."""
        default = self.parts.family.force_zeros_for_empty_prompt
        return bool(self.parts.model_index.get("force_zeros_for_empty_prompt", default))

    @property
    def guidance_embedded(self) -> bool:
        """The network takes the guidance scale as an input (a full LCM U-Net's w-embedding,
        FLUX.1-dev's distilled guidance)."""
        c = self.unet.config
        embeds = bool(getattr(c, "guidance_embeds", False))  # FLUX.1-dev
        return embeds or getattr(c, "time_cond_proj_dim", None) is not None  # LCM

    def two_pass(self, r: Request) -> bool:
        """Classifier-free guidance runs an unconditioned pass: scale > 1, not embedded; with an
        embedded scale, "true CFG" (``true_cfg_scale`` > 1, diffusers' FluxPipeline) does."""
        if self.guidance_embedded:
            return r.true_cfg_scale > 1.0
        return r.guidance_scale > 1.0

    def text_encoder(self, clip_skip: int = 1) -> TextEncoder:
        """The family's text encoder(s) behind one interface (ldm.text.encoders), per clip skip."""
        key = (clip_skip, self.max_sequence_length)
        if key not in self._text_encoders:
            self._text_encoders[key] = text_encoder_for(self.parts, *key)
        return self._text_encoders[key]

    # ---- LoRAs and speed ------------------------------------------------------------------
    def apply_lora(self, path: str | Path, scale: float = 1.0):
        """Merge a LoRA file (diffusers/PEFT or kohya keys) into the weights; returns the report."""
        if self.accel is not None:
            raise LdmError("merge LoRAs before the first image (the model is already accelerated)")
        report = apply_lora(self.parts, path, scale)
        self.loras.append(lora_record(path, scale))  # name, scale, A1111 hash, path
        return report

    def accelerate(self, mode: str | None = None):
        """Apply the accelerator ``mode`` (None: $LDM_ACCEL, else auto) to the U-Net and VAE once.

        Runs after the LoRAs are merged (the first call does it at the latest); returns the
        ``ldm.accel.Decision`` for the U-Net, which the records name.
        """
        if self.accel is None:
            mode = self.accel_mode if mode is None else mode
            self.accel = apply_accel(self.unet, mode, device=self.device, dtype=self.dtype)
            apply_accel(self.vae, mode, device=self.device, dtype=self.dtype)
        return self.accel

    def enable_offload(self, mode: str) -> None:
        """Keep the parts in CPU RAM, each on the device only while it runs ("model": a part
        at a time, "sequential": a module at a time; "none": off). GPUs only (ldm.offload)."""
        check_offload(mode, self.device)
        if mode != "none" and (self.accel_mode or os.environ.get(ACCEL_ENV)) == "inductor":
            raise LdmError("--offload does not combine with --accel inductor (compiled graphs "
                           "would capture the weights' devices)")  # fmt: skip
        enable_offload(self, mode)

    # ---- the call -----------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        callback: StepCallback | None = None,
        preview: PreviewCallback | None = None,
        encode: EncodeText | None = None,
        **settings,
    ) -> list[Generated]:
        """Generate one image per (prompt, seed); image i draws all its noise from seed i.

        ``settings`` are :meth:`prepare`'s (steps, sampler, guidance_scale, ...); ``encode``
        replaces :meth:`encode_text` (same signature), e.g. by a cache of encodings; ``preview``
        sees each step's denoised latents (decode them with :meth:`decode` for a live view).
        """
        request = self.prepare(prompts, seeds, **settings)
        self.accelerate()
        try:
            cond, uncond = (encode or self.encode_text)(
                request.prompts, request.negatives, request.clip_skip, self.two_pass(request)
            )
            cond, uncond = self.condition(request, cond, uncond)
            latents = self.denoise(request, cond, uncond, callback, preview=preview)
            images, retried = self.decode(latents)
        finally:
            if self.offload is not None:  # every part back in CPU RAM between calls
                self.offload.release()
        return [
            Generated(image, self.record(request, i, retried[i])) for i, image in enumerate(images)
        ]

    # ---- steps of the call --------------------------------------------------------------------
    def prepare(self, prompts: list[str], seeds: list[int], **settings) -> Request:
        """Step 1: check the whole request before any work (one LdmError per bad value); the
        settings, their defaults and checks: :func:`ldm.prepare.prepare_request`."""
        return prepare_request(self, prompts, seeds, **settings)

    def encode_text(self, prompts, negatives, clip_skip, guided):
        """Step 2: A1111 prompts (emphasis, 75-token chunks) -> (cond, uncond or None).

        The ``encode`` argument of the call replaces it (ldm batch encodes each prompt once).
        """
        encoder = self.text_encoder(clip_skip)
        if guided:  # one batch, so prompts and negatives get the same number of 75-token chunks
            conds = encode_cond_uncond(encoder, prompts, negatives)
        else:
            conds = encode_prompts(encoder, prompts), None
        return tuple(c if c is None else c.to(self.device, self.dtype).lean() for c in conds)

    def condition(self, r: Request, cond, uncond):
        """Step 2b: an embedded guidance scale; SDXL: empty negatives as zeros, and the
        size/crop/aesthetic ids."""
        if self.guidance_embedded:  # LCM's w, FLUX.1-dev's guidance (uncond too: true CFG)
            w = torch.full((len(cond),), r.guidance_scale)
            cond = dataclasses.replace(cond, guidance=w)
            uncond = None if uncond is None else dataclasses.replace(uncond, guidance=w)
        if uncond is not None and self.force_zeros_for_empty_prompt:
            uncond = zero_rows(uncond, [n == "" for n in r.negatives])  # diffusers' None
        kind = self.parts.family.micro_conditioning
        if kind is None:
            return cond, uncond
        positive, negative = r.micro.ids(kind, r.height, r.width)
        uncond = None if uncond is None else with_time_ids(uncond, negative)
        return with_time_ids(cond, positive), uncond

    @torch.inference_mode()
    def denoise(
        self,
        r: Request,
        cond,
        uncond,
        callback: StepCallback | None = None,
        *,
        preview: PreviewCallback | None = None,
        generators: list[torch.Generator] | None = None,  # None: one per seed, fresh
        start_latents: torch.Tensor | None = None,  # (B, C, h, w) at the first sigma (hand-off)
    ):
        """Step 3: seeded noise -> sigmas -> guided sampler -> (B, C, h, w) float32 latents."""
        # 3a. the denoiser and the sigmas: the full schedule, cut at `strength` when starting
        # from an image (or at the base / refiner hand-off)
        family = self.parts.family  # FLUX: packed tokens, t in [0, 1], FluxPipeline's sigmas
        denoiser = make_denoiser(self.unet, self.schedule, r, self.dtype, family)
        sigmas = request_sigmas(r, denoiser, self.schedule, self.parts.scheduler_config,
                                self.image_seq_len(r), family)  # fmt: skip

        # 3b. per-image generators and starting latents (encode first, then noise: as diffusers)
        if generators is None:
            generators = [torch.Generator("cpu").manual_seed(s) for s in r.seeds]
        h, w = r.height // self.factor, r.width // self.factor
        latent_shape = (1, self.vae.latent_channels, h, w)
        init_latents = keep = extra = None
        vae = self._vae_for_pixels()  # (module, device=, dtype=)
        if r.init_image is not None:
            pixels = image_to_tensor(r.init_image, r.height, r.width)
            if r.start_from_image or (r.mode == "inpaint" and not self.is_inpainting_model):
                init_latents = encode_each(vae[0], pixels, generators, **vae[1])
        if start_latents is not None:  # the refiner continues the base's latents: no new noise
            x = start_latents.to(self.device, torch.float32)
        else:
            noise = torch.cat([torch.randn(latent_shape, generator=g) for g in generators])
            noise = noise.to(self.device, torch.float32)
            x = first_latents(r, denoiser, self.schedule, sigmas, noise, init_latents)
        if r.mode == "inpaint":
            keep, extra = inpaint_inputs(
                vae[0], r.mask, pixels, generators, self.is_inpainting_model, **vae[1]
            )

        # 3c. network -> denoiser -> guided denoiser (-> inpaint blending), NaN-checked
        scale = r.true_cfg_scale if self.guidance_embedded else r.guidance_scale
        scale = scale if uncond is not None else 1.0  # 1: the conditioned pass only
        denoise = cfg(
            denoiser, cond, uncond, scale, rescale=r.guidance_rescale,
            batched=r.batched_guidance, concat=extra, slg=skip_layer_guidance(r, sigmas),
        )  # fmt: skip
        if keep is not None:
            denoise = blend_known(denoise, init_latents, keep)
        progress = Progress(len(sigmas) - 1, callback, preview)
        denoise = nan_guard(denoise, progress, self.dtype)

        # 3d. sample (later noise for image i comes from generator i too)
        noise_fn = make_noise(generators, latent_shape[1:], device=self.device)
        options = sampler_options(r, denoiser, self.schedule)
        x = r.spec.function(denoise, x, sigmas, noise=noise_fn, callback=progress, **options)
        if keep is not None:
            x = keep * init_latents + (1 - keep) * x
        if not torch.isfinite(x).all():
            raise LdmError(f"the U-Net produced NaN/Inf in {DTYPE_NAMES[self.dtype]}; try fp32")
        return x

    def record(self, r: Request, i: int, retried: bool) -> dict:
        """Step 5: everything needed to make image i again (the JSON record beside the PNG)."""
        return dict(
            prompt=r.prompts[i],
            negative_prompt=r.negatives[i],
            seed=r.seeds[i],
            **r.settings(micro=self.parts.family.micro_conditioning is not None),
            model=self.model_name,
            model_hash=self.model_hash,
            model_path=str(self.model_path) if self.model_path else None,
            dtype=DTYPE_NAMES[self.dtype],
            device=self.device.type,
            accel=self.accel.mode if self.accel is not None else "off",
            offload=self.offload.mode if self.offload is not None else "none",
            rng="CPU",  # A1111's name for per-image CPU generators
            nan_retry_fp32=retried,
            loras=list(self.loras),
            ldm_version=__version__,
            # flow models (their default schedule's infotext label); FLUX.1-dev: guidance_scale
            # is the embedded (distilled) scale, written as Forge does
            **({"flow": True} if self.schedule is None else {}),
            **({"embedded_guidance": True} if self._embeds_guidance_scale else {}),
        )

    @property
    def _embeds_guidance_scale(self) -> bool:
        return bool(getattr(self.parts.unet.config, "guidance_embeds", False))
