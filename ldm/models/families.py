"""Model families as data: what a family is made of, its defaults, and how to recognise it.

One entry per family says which network it runs, which text encoders feed it and how their
outputs combine, its latent scaling, its parametrisation, its sampling defaults, and what an
original single file's keys cannot say about it. Detection (from a diffusers folder's
``model_index.json`` and component configs, or from a single file's keys) is written here once.
Families other code knows of but ldm cannot load yet are recognised by name, so the user hears
"an SDXL checkpoint" instead of a missing-key error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ldm.errors import CheckpointError
from ldm.models.autoencoder import AutoencoderConfig

# scheduler of the original CompVis / Stability releases (what a single file cannot say)
_SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     num_train_timesteps=1000, steps_offset=1, skip_prk_steps=True,
                     set_alpha_to_one=False, clip_sample=False, trained_betas=None)  # fmt: skip


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family and where its parts live in a diffusers folder."""

    kind: str  # "clip" (OpenAI CLIP), "openclip" (OpenCLIP in CLIP's layout), "t5"
    subfolder: str = "text_encoder"  # weights + config.json
    tokenizer: str = "tokenizer"  # tokenizer files


@dataclass(frozen=True)
class Family:
    """Everything ldm knows about one model family, in one place."""

    name: str  # registry key, recorded in image metadata: "sd1", "sd2"
    label: str  # for people: "Stable Diffusion 1.x"
    pipeline_class: str  # model_index.json "_class_name" that diffusers writes for it
    network: str  # the latent network's diffusers class name (ldm.models.build.NETWORKS)
    text_encoders: tuple[TextEncoderSpec, ...]  # in the order their outputs are combined
    text_combine: str  # "single": one encoder's hidden states are the context
    prediction_type: str  # parametrisation: epsilon | v_prediction | sample | flow
    vae_scaling_factor: float  # latents ~ unit variance (LDM App. G)
    vae_shift_factor: float | None = None  # subtracted before scaling (None: 0)
    sampler: str = "dpmpp_2m"  # default sampler (ldm.sampling table name)
    schedule: str = "default"  # default sigma schedule ("default": the checkpoint's spacing)
    steps: int = 20  # default number of sampler steps
    guidance_scale: float = 7.5  # default classifier-free guidance scale
    # what an original single file's keys cannot say: diffusers config fields per component
    single_file: dict = field(default_factory=dict, compare=False, hash=False)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="sd1",
            label="Stable Diffusion 1.x",
            pipeline_class="StableDiffusionPipeline",
            network="UNet2DConditionModel",
            text_encoders=(TextEncoderSpec("clip"),),
            text_combine="single",
            prediction_type="epsilon",
            vae_scaling_factor=AutoencoderConfig.scaling_factor,
            single_file=dict(  # the real SD 1.5 configs
                unet=dict(attention_head_dim=8, upcast_attention=False, sample_size=64),
                vae=dict(sample_size=512),
                text_encoder=dict(hidden_act="quick_gelu", projection_dim=768),
                scheduler=dict(
                    _SD_SCHEDULER, _class_name="PNDMScheduler", prediction_type="epsilon"
                ),
            ),  # fmt: skip
        ),
        Family(
            name="sd2",
            label="Stable Diffusion 2.x",
            pipeline_class="StableDiffusionPipeline",
            network="UNet2DConditionModel",
            text_encoders=(TextEncoderSpec("openclip"),),
            text_combine="single",
            prediction_type="v_prediction",  # SD 2.x 768; the 512 base is epsilon (its config)
            vae_scaling_factor=AutoencoderConfig.scaling_factor,
            single_file=dict(  # the real SD 2.1 (768, v) configs; heads: one per 64 channels
                unet=dict(upcast_attention=True, sample_size=96),
                vae=dict(sample_size=768),
                text_encoder=dict(hidden_act="gelu", projection_dim=512),
                scheduler=dict(
                    _SD_SCHEDULER, _class_name="DDIMScheduler", prediction_type="v_prediction"
                ),
            ),  # fmt: skip
        ),
    )
}

# families other tools load and ldm does not yet: pipeline class / single-file key -> label
KNOWN_ELSEWHERE = {
    "StableDiffusionXLPipeline": "SDXL",
    "StableDiffusionXLImg2ImgPipeline": "SDXL refiner",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "FLUX.1",
    "LatentConsistencyModelPipeline": "LCM",
}
SINGLE_FILE_MARKERS = (  # a key fragment that identifies a family, checked in this order
    ("conditioner.embedders.", "SDXL"),
    ("joint_blocks.", "Stable Diffusion 3"),
    ("double_blocks.", "FLUX.1"),
)
UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # OpenAI CLIP (SD 1.x)
OPENCLIP_PREFIX = "cond_stage_model.model."  # OpenCLIP (SD 2.x)


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise CheckpointError(f"unknown model family {name!r}; ldm loads {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _unsupported(label: str, source: str) -> CheckpointError:
    loads = " and ".join(f.label for f in FAMILIES.values())
    return CheckpointError(f"{source}: {label} models are not supported yet (ldm loads {loads})")


def from_folder(model_index: dict, text_encoder_config: dict | None, source: str) -> Family:
    """The family of a diffusers folder, from ``model_index.json`` and the text encoder config."""
    pipeline_class = model_index.get("_class_name", "StableDiffusionPipeline")
    if pipeline_class in KNOWN_ELSEWHERE:
        raise _unsupported(KNOWN_ELSEWHERE[pipeline_class], source)
    known = sorted({f.pipeline_class for f in FAMILIES.values()})
    if pipeline_class not in known:
        raise CheckpointError(
            f"{source}: pipeline class {pipeline_class!r} is not one ldm loads ({', '.join(known)})"
        )
    return _by_text_activation((text_encoder_config or {}).get("hidden_act", "quick_gelu"))


def from_keys(keys: Iterable[str], source: str) -> Family:
    """The family of an original single file (CompVis / A1111 / ComfyUI layout) from its keys."""
    keys = list(keys)
    for marker, label in SINGLE_FILE_MARKERS:
        if any(marker in k for k in keys):
            raise _unsupported(label, source)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise CheckpointError(
            f"{source}: no U-Net weights ({UNET_PREFIX}*): not a Stable Diffusion file"
        )
    if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
        return FAMILIES["sd2"]
    if any(k.startswith(CLIP_PREFIX) for k in keys):
        return FAMILIES["sd1"]
    raise CheckpointError(f"{source}: no text encoder weights (cond_stage_model.*)")


def from_text_encoder(text_encoder) -> Family:
    """The family of a built model, from its text encoder (the only part that differs)."""
    return _by_text_activation(text_encoder.config.hidden_act)


def _by_text_activation(hidden_act: str) -> Family:
    """SD 1.x and 2.x share a pipeline class: OpenCLIP uses exact GELU, OpenAI's CLIP quick_gelu."""
    return FAMILIES["sd2" if hidden_act == "gelu" else "sd1"]
