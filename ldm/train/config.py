"""Training configuration: one YAML file mapped onto these dataclasses (see ldm.config).

A run is a list of stages. Each stage says which parts train (vae, unet, text_encoder and, for
SDXL, text_encoder_2), how (full or LoRA), for how many steps and on what data; parts not trained
in a stage are frozen.
The model comes from a checkpoint (``model.pretrained``) or is built from nothing from a model
config (``model.config``, e.g. configs/models/shapes64.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ModelSource:
    pretrained: str | None = None  # diffusers folder or single file to start from
    config: str | None = None  # model config YAML to build from nothing (configs/models/*.yaml)
    # keys of the start model's scheduler config to replace, kept in its export (e.g. the static
    # "shift" a flow model samples with; loss.training_shift may then train at another)
    scheduler: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    source: str = "shapes"  # "shapes" (the built-in world) or a folder / .csv / .tar path
    resolution: int = 64
    center_crop: bool = True
    random_flip: bool = False
    buckets: bool = False  # kohya aspect-ratio buckets
    bucket_no_upscale: bool = False
    bucket_steps: int = 64  # bucket sides are multiples of this (kohya's bucket_reso_steps)
    bucket_min: int | None = None  # smallest bucket side (None: max(bucket_steps, resolution/2))
    bucket_max: int | None = None  # largest bucket side (None: 2 * resolution)
    caption_dropout: float = 0.1  # to the empty prompt, for classifier-free guidance
    max_image_pixels: int = 64_000_000
    shapes_seed: int = 0
    shapes_size_words: float = 0.3  # probability of size words in shapes captions
    shapes_mix: str | None = None  # task weights, "position=2,colors=0.5" (None: uniform)
    shapes_layout: str = "random"  # "random" (the world's) or "tidy": caption-given cells
    cache_latents: bool = False  # precompute VAE posterior mean/std (requires a frozen VAE)
    cache_size: int = 0  # shapes world: number of distinct images to cache (0 = stream)
    # precompute text-encoder outputs (context + pooled) per caption, on disk in the run folder
    # (requires frozen text encoders); SDXL's micro-conditioning is still computed per sample
    cache_text: bool = False
    aesthetic_score: float = 6.0  # SDXL refiner's score id (diffusers' pipeline default)
    # source "teacher" (distill stages): the teacher's own samples of these prompts (one per
    # line), cache_size of them, generated once into the run folder (ldm.train.teacher_data)
    prompts: str | None = None
    teacher_steps: int | None = None  # sampler steps for those samples (None: model default)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0  # final lr / lr for cosine and linear
    use_8bit: bool = False  # bitsandbytes AdamW8bit, when installed


@dataclass
class LossConfig:
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None  # None: model's
    min_snr_gamma: float | None = 5.0  # Hang et al. 2023; None disables; discrete models only
    # flow models (a FlowMatch scheduler config): the sigmas they train at and their weighting
    # (ldm.train.loss.flow_training_sigmas / flow_loss_weight; SD3 paper defaults)
    sigma_sampling: Literal["logit_normal", "mode", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    # the static shift of the training times; None: the one the model samples with (its
    # scheduler's shift, FLUX.1-dev's dynamic one), as diffusers' scripts (kohya: training_shift)
    training_shift: float | None = None
    # FLUX.1-dev: the distilled guidance scale its transformer embeds while training (diffusers'
    # train_dreambooth_lora_flux --guidance_scale 3.5, FluxPipeline's default; docs/lora.md)
    embedded_guidance_scale: float = 3.5
    noise_offset: float = 0.0
    multires_noise_iterations: int = 0  # kohya's pyramid noise; 0 disables
    multires_noise_discount: float = 0.3
    kl_weight: float = 1e-6  # autoencoder stage only
    skip_nonfinite: bool = True  # skip a step whose loss is NaN/Inf (else stop the run)
    max_nonfinite: int = 10  # consecutive non-finite steps before the run stops


@dataclass
class EMAConfig:
    decay: float = 0.9999
    warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t))
    enabled: bool = True


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 8.0
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder: bool = False  # also LoRA on every text encoder (SDXL: both, kohya te1/te2)
    text_encoder_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )


@dataclass
class DistillConfig:
    """Latent consistency distillation (Luo et al. 2023, Alg. 1): ldm.train.distill."""

    num_ddim_timesteps: int = 50  # N: the skipping-step solver's grid; skip k = T / N
    guidance_scale: float = 7.5  # the teacher's CFG scale w, as the pipeline's: u + w (c - u)
    guidance_scale_max: float | None = None  # w ~ U[guidance_scale, max] (None: w fixed)
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = 0.001  # pseudo-Huber's c (diffusers' example)
    timestep_scaling: float = 10.0  # LCM boundary conditions' scaling (LCMScheduler's)
    target_decay: float = 0.95  # EMA decay of the target network (0: the online student)
    # the student's step counts: validation grids at each, the first stored as its default
    student_steps: list[int] = field(default_factory=lambda: [4, 2, 1])
    # share of each batch noised from the student's own one-step sample, at the timesteps its
    # later sampling steps start from (ldm.train.distill; 0: data latents only, as the paper)
    backward_fraction: float = 0.0
    # the consistency function: "lcm" maps x_t to x0 through LCM's boundary conditions (the
    # ``lcm`` sampler); "tcd" maps it to a random earlier solver timestep s along the DDIM
    # direction (Zheng et al. 2024, trajectory consistency; the ``tcd`` sampler)
    consistency: Literal["lcm", "tcd"] = "lcm"
    # the sampler stored as the student's default (None: its consistency function's, lcm or tcd;
    # a tcd student also samples with lcm: TCD's gamma 1)
    sampler: str | None = None
    eta: float | None = None  # stored with it (a TCD student's gamma; None: the sampler's own)
    # a full student exported as a LoRA of this rank on its teacher: the truncated SVD of each
    # weight's change (ldm.formats.lora_extract; None: a full folder)
    export_lora_rank: int | None = None


@dataclass
class StageConfig:
    name: str = "main"
    train: list[str] = field(default_factory=lambda: ["unet"])  # vae, unet, text_encoder(_2)
    method: Literal["full", "lora"] = "full"
    steps: int = 1000
    batch_size: int = 16
    gradient_accumulation: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig | None = None  # None: the run's data section
    distill: DistillConfig | None = None  # set: a consistency-distillation stage (ldm distill)


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    seed: int = 0
    model: ModelSource = field(default_factory=ModelSource)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    clip_skip: int = 1  # text-encoder layer, counted as ldm.text.encoders.text_encoder_for does
    gradient_checkpointing: bool = False
    # U-Net activation layout; NCHW trained the demo model 13% faster in bf16 on the CPU
    channels_last: bool = True
    accel: str = "auto"  # ldm.accel mode for the U-Net: auto | ldm-cpu | inductor | openvino | off
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 0  # 0: only at the end of each stage
    validation_prompts: list[str] = field(default_factory=list)
    validation_seed: int = 1234
    validation_steps: int = 20
    validation_guidance: float = 5.0
    export_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    # at the end of a stage that kept EMA weights, carry them on (later stages, export);
    # false: carry on with the raw trained weights
    export_ema: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, copied to the run
