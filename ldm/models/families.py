"""Model families as data: what a family is made of, its defaults, and how to recognise it.

One entry per family says which network it runs, which text encoders feed it and how their
outputs combine, its latent scaling, its parametrisation, its sampling defaults, and what an
original single file's keys cannot say about it. Detection (from a diffusers folder's
``model_index.json`` and component configs, or from a single file's keys) is written here once.
Families other code knows of but ldm cannot load yet are recognised by name, so the user hears
"an SDXL checkpoint" instead of a missing-key error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from ldm.errors import CheckpointError
from ldm.models.autoencoder import AutoencoderConfig
from ldm.models.family_configs import (
    SD_SCHEDULER,
    flux_single_file,
    sd3_single_file,
    sdxl_single_file,
)


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family and where its parts live in a diffusers folder."""

    kind: str  # "clip" (OpenAI CLIP), "openclip" (OpenCLIP in CLIP's layout), "t5"
    subfolder: str = "text_encoder"  # weights + config.json (also the ModelParts attribute)
    tokenizer: str = "tokenizer"  # tokenizer files (also the ModelParts attribute)
    # context: "last" = clip skip from the last layer, through the final LayerNorm (SD 1.x/2.x);
    # "penultimate" = from the penultimate layer, no final LayerNorm (SDXL, as diffusers counts)
    hidden: str = "last"
    optional: bool = False  # may be absent from a folder (SD3's T5: zeros in its place)


@dataclass(frozen=True)
class Family:
    """Everything ldm knows about one model family, in one place."""

    name: str  # registry key, recorded in image metadata: "sd1", "sd2"
    label: str  # for people: "Stable Diffusion 1.x"
    pipeline_class: str  # model_index.json "_class_name" that diffusers writes for it
    network: str  # the latent network's diffusers class name (ldm.models.build.NETWORKS)
    text_encoders: tuple[TextEncoderSpec, ...]  # in the order their outputs are combined
    text_combine: str  # "single": one encoder's context; "concat": contexts side by side (D axis)
    prediction_type: str  # parametrisation: epsilon | v_prediction | sample | flow
    vae_scaling_factor: float  # latents ~ unit variance (LDM App. G)
    vae_shift_factor: float | None = None  # subtracted before scaling (None: 0)
    sampler: str = "dpmpp_2m"  # default sampler (ldm.sampling table name)
    # SDXL: the checkpoint's scheduler class picks the default sampler when the table has it
    sampler_from_checkpoint: bool = False
    schedule: str = "default"  # default sigma schedule ("default": the checkpoint's spacing)
    steps: int = 20  # default number of sampler steps
    guidance_scale: float = 7.5  # default classifier-free guidance scale
    # SDXL micro-conditioning ids (ldm.text.micro): None, "size" (original size, crop, target
    # size: 6 ids) or "aesthetic" (original size, crop, aesthetic score: 5 ids, the refiner)
    micro_conditioning: str | None = None
    # an empty negative prompt means zero context and pooled (model_index.json may override)
    force_zeros_for_empty_prompt: bool = False
    also_pipelines: tuple[str, ...] = ()  # other model_index classes that hold this family
    vae_upcast: bool = False  # fp16: run the VAE in fp32 when its config says force_upcast
    # what an original single file's keys cannot say: diffusers config fields per component
    network_folder: str = "unet"  # its folder in a diffusers model ("transformer": SD3, FLUX)
    single_file: dict = field(default_factory=dict, compare=False, hash=False)
    max_sequence_length: int = 256  # T5 tokens of the context (SD3: 256; FLUX.1-dev: 512)
    sample_size: int = 64  # latent size when the network config names none (FLUX: 128, 1024 px)
    # flow models: the network's timestep is t * timestep_scale (SD3: 1000; FLUX takes t in
    # [0, 1]); "default" sigmas as the family's diffusers pipeline passes them (FluxPipeline:
    # linspace(1, 1/N, N)); latent cells per image token side (FLUX packs 2 x 2)
    timestep_scale: float = 1000.0
    pipeline_sigmas: bool = False
    latent_patch: int = 1
    # what changes for a network without guidance_embeds (FLUX.1-schnell; see for_network)
    unguided: dict = field(default_factory=dict, compare=False, hash=False)

    def for_network(self, network_config) -> Family:
        """The family as a model with this network config samples: a FLUX.1 transformer
        without ``guidance_embeds`` is schnell (timestep-distilled: its own defaults)."""
        if not self.unguided:
            return self
        c = network_config  # a config.json dict or a FluxConfig
        embeds = c.get("guidance_embeds") if isinstance(c, dict) else c.guidance_embeds
        return self if embeds else dataclasses.replace(self, **self.unguided)

    def sampling_defaults(self, scheduler_config: dict, stored: dict | None = None) -> dict:
        """Sampler, schedule, steps and guidance a model of this family generates with: the
        family's, the checkpoint's scheduler class where the family takes it (SDXL ships Euler),
        and a model's stored defaults (ModelParts.defaults) over both."""
        from ldm.sampling.samplers import from_scheduler_config

        sampler, schedule = self.sampler, self.schedule
        if self.sampler_from_checkpoint:
            sampler, schedule = from_scheduler_config(scheduler_config) or (sampler, schedule)
        defaults = dict(sampler=sampler, schedule=schedule, steps=self.steps,
                        guidance_scale=self.guidance_scale)  # fmt: skip
        keys = (*defaults, "eta")  # eta only where stored (a TCD student's gamma)
        return {**defaults, **{k: v for k, v in (stored or {}).items() if k in keys}}


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
                    SD_SCHEDULER, _class_name="PNDMScheduler", prediction_type="epsilon"
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
                    SD_SCHEDULER, _class_name="DDIMScheduler", prediction_type="v_prediction"
                ),
            ),  # fmt: skip
        ),
        Family(
            name="lcm",
            label="Latent Consistency Model (SD 1.x)",
            pipeline_class="LatentConsistencyModelPipeline",
            network="UNet2DConditionModel",
            text_encoders=(TextEncoderSpec("clip"),),
            text_combine="single",
            prediction_type="epsilon",
            vae_scaling_factor=AutoencoderConfig.scaling_factor,
            # diffusers' LatentConsistencyModelPipeline: the w-embedded U-Net, no CFG pass
            sampler="lcm",
            sampler_from_checkpoint=True,
            steps=4,
            guidance_scale=8.5,
            single_file=dict(  # LCM Dreamshaper v7's configs (SD 1.5 + the w-embedding)
                unet=dict(
                    attention_head_dim=8,
                    upcast_attention=False,
                    sample_size=96,
                    time_cond_proj_dim=256,
                ),
                vae=dict(sample_size=768),
                text_encoder=dict(hidden_act="quick_gelu", projection_dim=768),
                scheduler=dict(
                    SD_SCHEDULER,
                    _class_name="LCMScheduler",
                    prediction_type="epsilon",
                    original_inference_steps=50,
                    timestep_scaling=10.0,
                    set_alpha_to_one=True,
                ),
            ),  # fmt: skip
        ),
        Family(
            name="sdxl",
            label="Stable Diffusion XL",
            pipeline_class="StableDiffusionXLPipeline",
            also_pipelines=("StableDiffusionXLInpaintPipeline", "StableDiffusionXLImg2ImgPipeline"),
            network="UNet2DConditionModel",
            text_encoders=(
                TextEncoderSpec("clip", hidden="penultimate"),  # CLIP ViT-L
                TextEncoderSpec("openclip", "text_encoder_2", "tokenizer_2", "penultimate"),  # bigG
            ),
            text_combine="concat",
            prediction_type="epsilon",
            vae_scaling_factor=0.13025,
            sampler="euler",  # SDXL 1.0's EulerDiscreteScheduler
            sampler_from_checkpoint=True,
            steps=30,
            guidance_scale=5.0,  # diffusers' SDXL default
            micro_conditioning="size",
            force_zeros_for_empty_prompt=True,
            vae_upcast=True,
            single_file=sdxl_single_file(refiner=False),
        ),
        Family(
            name="sdxl-refiner",
            label="Stable Diffusion XL refiner",
            pipeline_class="StableDiffusionXLImg2ImgPipeline",
            network="UNet2DConditionModel",
            text_encoders=(
                TextEncoderSpec("openclip", "text_encoder_2", "tokenizer_2", "penultimate"),
            ),
            text_combine="concat",
            prediction_type="epsilon",
            vae_scaling_factor=0.13025,
            sampler="euler",
            steps=30,
            guidance_scale=5.0,
            micro_conditioning="aesthetic",
            vae_upcast=True,
            sampler_from_checkpoint=True,
            single_file=sdxl_single_file(refiner=True),
        ),
        Family(
            name="sd3",
            label="Stable Diffusion 3",
            pipeline_class="StableDiffusion3Pipeline",
            network="SD3Transformer2DModel",
            network_folder="transformer",
            text_encoders=(
                TextEncoderSpec("clip", hidden="penultimate"),  # CLIP-L (with projection)
                TextEncoderSpec("openclip", "text_encoder_2", "tokenizer_2", "penultimate"),
                TextEncoderSpec("t5", "text_encoder_3", "tokenizer_3", optional=True),  # T5-XXL
            ),
            text_combine="sd3",
            prediction_type="flow",
            vae_scaling_factor=1.5305,
            vae_shift_factor=0.0609,
            sampler="euler",  # FlowMatchEulerDiscreteScheduler
            steps=28,  # diffusers' StableDiffusion3Pipeline defaults
            guidance_scale=7.0,
            vae_upcast=True,
            single_file=sd3_single_file(),
        ),
        Family(
            name="flux",
            label="FLUX.1",
            pipeline_class="FluxPipeline",
            also_pipelines=("FluxImg2ImgPipeline", "FluxInpaintPipeline"),
            network="FluxTransformer2DModel",
            network_folder="transformer",
            text_encoders=(
                TextEncoderSpec("clip"),  # CLIP ViT-L: only its pooled output (768, unprojected)
                TextEncoderSpec("t5", "text_encoder_2", "tokenizer_2"),  # T5-XXL: the context
            ),
            text_combine="flux",
            prediction_type="flow",
            vae_scaling_factor=0.3611,
            vae_shift_factor=0.1159,
            sampler="euler",  # FlowMatchEulerDiscreteScheduler
            steps=28,  # diffusers' FluxPipeline (dev): 28 steps, embedded guidance 3.5
            guidance_scale=3.5,
            max_sequence_length=512,
            sample_size=128,  # FluxPipeline's default_sample_size
            timestep_scale=1.0,
            pipeline_sigmas=True,
            latent_patch=2,
            single_file=flux_single_file(dev=True),
            unguided=dict(  # FLUX.1-schnell: 4 steps, no guidance, 256 T5 tokens
                label="FLUX.1-schnell",
                steps=4,
                guidance_scale=1.0,
                max_sequence_length=256,
                single_file=flux_single_file(dev=False),
            ),  # fmt: skip
        ),
    )
}

# families other tools load and ldm does not yet: pipeline class / single-file key -> label
KNOWN_ELSEWHERE = {
    "FluxFillPipeline": "FLUX.1 Fill",  # 384 input channels: image, mask and masked image
    "FluxControlPipeline": "FLUX.1 Depth/Canny",  # 128 input channels: image and control
    "FluxKontextPipeline": "FLUX.1 Kontext",
}
SINGLE_FILE_MARKERS = (  # a key fragment that identifies a family, checked in this order
    ("edm_mean", "Playground v2.5 (EDM SDXL)"),  # EDM-parametrised SDXL variants
    ("edm_vpred.sigma_max", "EDM v-prediction SDXL"),
)
UNET_PREFIX = "model.diffusion_model."
FLUX_BLOCKS = "double_blocks."  # FLUX.1 (BFL's names), under UNET_PREFIX (ComfyUI) or bare (BFL)
SD3_BLOCKS = "joint_blocks."  # MMDiT (SD3 / SD3.5), under UNET_PREFIX or bare (a transformer file)
CLIP_PREFIX = "cond_stage_model.transformer."  # OpenAI CLIP (SD 1.x)
OPENCLIP_PREFIX = "cond_stage_model.model."  # OpenCLIP (SD 2.x)
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL base: CLIP ViT-L
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL base: OpenCLIP bigG
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."  # SDXL refiner: OpenCLIP bigG only


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
    holders = [
        f for f in FAMILIES.values() if pipeline_class in (f.pipeline_class, *f.also_pipelines)
    ]
    if not holders:
        known = sorted(
            {c for f in FAMILIES.values() for c in (f.pipeline_class, *f.also_pipelines)}
        )
        raise CheckpointError(
            f"{source}: pipeline class {pipeline_class!r} is not one ldm loads ({', '.join(known)})"
        )
    if holders[0].name == "sdxl":
        # the refiner: second encoder only, aesthetic-score ids (diffusers' img2img pipeline flag)
        no_first = (model_index.get("text_encoder") or [None])[0] is None
        refiner = model_index.get("requires_aesthetics_score", False) or no_first
        return FAMILIES["sdxl-refiner" if refiner else "sdxl"]
    if holders[0].name not in ("sd1", "sd2"):  # one family per pipeline class
        return holders[0]
    return _by_text_activation((text_encoder_config or {}).get("hidden_act", "quick_gelu"))


def from_keys(keys: Iterable[str], source: str) -> Family:
    """The family of an original single file (CompVis / A1111 / ComfyUI layout) from its keys."""
    keys = list(keys)
    for marker, label in SINGLE_FILE_MARKERS:
        if any(marker in k for k in keys):
            raise _unsupported(label, source)
    if any(k.startswith((UNET_PREFIX + FLUX_BLOCKS, FLUX_BLOCKS)) for k in keys):
        return FAMILIES["flux"]  # ldm.formats.original_flux (schnell: Family.for_network)
    if any(k.startswith((UNET_PREFIX + SD3_BLOCKS, SD3_BLOCKS)) for k in keys):
        return FAMILIES["sd3"]  # text encoders may be absent (ldm.formats.original_sd3)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise CheckpointError(
            f"{source}: no U-Net weights ({UNET_PREFIX}*): not a Stable Diffusion file"
        )
    if any(k.startswith(SDXL_OPENCLIP_PREFIX) for k in keys):
        return FAMILIES["sdxl"]
    if any(k.startswith(REFINER_OPENCLIP_PREFIX) for k in keys):
        return FAMILIES["sdxl-refiner"]
    if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
        return FAMILIES["sd2"]
    if any(k.startswith(CLIP_PREFIX) for k in keys):
        return FAMILIES["sd1"]
    raise CheckpointError(
        f"{source}: no text encoder weights (cond_stage_model.* or conditioner.embedders.*)"
    )


def from_text_encoder(text_encoder) -> Family:
    """The family of a built model, from its text encoder (the only part that differs)."""
    return _by_text_activation(text_encoder.config.hidden_act)


def _by_text_activation(hidden_act: str) -> Family:
    """SD 1.x and 2.x share a pipeline class: OpenCLIP uses exact GELU, OpenAI's CLIP quick_gelu."""
    return FAMILIES["sd2" if hidden_act == "gelu" else "sd1"]
