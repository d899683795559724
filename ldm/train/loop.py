"""The training loop: stages of (VAE | U-Net | text encoder) training, read top to bottom.

``train`` runs each stage (``prepare_stage``) step by step (``train_step``, ``after_step``); the
diffusion loss is the Denoiser's (``ldm.denoiser.Denoiser.loss``), weighted by ``train.loss``,
on the Cond that ``ldm.train.conditioning`` builds (text, dropout, SDXL time ids). Randomness is
a pure function of (seed, stage, step, rank): each step makes its own generator (LoRA's initial
weights come from the seed too), so resuming from a checkpoint needs only weights, optimizer,
EMA and the step counter to continue exactly as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm import accel
from ldm.denoiser import Denoiser
from ldm.dtypes import DTYPES
from ldm.errors import CheckpointError, LdmError
from ldm.train import checkpoint as ckpt
from ldm.train.conditioning import TrainingText
from ldm.train.config import StageConfig, TrainConfig
from ldm.train.distill import Distiller, check_stage, distill_loss_for_step
from ldm.train.ema import EMA
from ldm.train.lora import merge_lora, save_lora
from ldm.train.model import (
    AutoencoderRoundTrip,
    calibrate_latent_scale,
    export_model,
    load_start_model,
    model_parts,
    set_trainable,
    stage_batches,
)
from ldm.train.optim import lr_at, make_optimizer
from ldm.train.runlog import RunLog
from ldm.train.step_loss import (
    autoencoder_loss_for_step,
    diffusion_loss_for_step,
    training_denoiser,
)
from ldm.train.student import check_export, export_student


def step_generator(seed: int, stage: int, step: int, rank: int) -> torch.Generator:
    """The one source of randomness for a training step (tuple hashes of ints are stable)."""
    return torch.Generator().manual_seed(hash((seed, stage, step, rank)) & (2**63 - 1))


def attention_kernels(device: torch.device, mixed_precision: str):
    """SDPA kernels for a training forward: on the CPU in bf16, the math kernel.

    The CPU flash kernel's bf16 backward took 320 ms of a 1.0 s demo-model step (measured,
    torch 2.14); the math kernel (softmax(QK^T/sqrt(d))V from plain ops, Vaswani et al. 2017)
    made the step 1.2x faster. fp32 keeps the flash kernel, which is faster there.
    """
    if device.type == "cpu" and mixed_precision == "bf16":
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


@dataclass
class Run:
    """What every stage of a run shares."""

    cfg: TrainConfig
    accelerator: Any  # accelerate.Accelerator: device, rank, autocast, DDP
    parts: Any  # ModelParts being trained
    log: RunLog
    run_dir: Path
    global_step: int  # optimizer steps over all stages
    # parts some finished stage changed (trained, or a LoRA merged in): a checkpoint holds these
    # whole; the others are the start model's, rebuilt on resume (a 12 B FLUX LoRA run saves
    # its LoRA, not the transformer and T5)
    changed: set[str] = field(default_factory=set)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class Stage:
    """One stage's moving parts: what trains, how, and on what."""

    index: int  # position in cfg.stages (part of every step's seed)
    config: StageConfig
    trained: dict[str, torch.nn.Module]  # part name -> module, as set_trainable left it
    wrapped: dict[str, torch.nn.Module]  # the same, prepared by accelerate (DDP)
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    emas: dict[str, EMA]
    data: Any  # StageData
    denoiser: Denoiser  # the U-Net (wrapped when it trains) with the stage's parametrisation
    text: TrainingText  # captions and sizes -> Cond (ldm.train.conditioning)
    distiller: Distiller | None = None  # a distill stage's teacher, solver and target
    nonfinite: int = 0  # consecutive skipped steps


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> Path:
    """Run every stage of ``cfg``; return the exported model folder."""
    # --- run folder, accelerator, model (and the checkpoint to continue from) ----------------
    for stage in cfg.stages:  # before any work: distill stages and exports that cannot run
        if stage.distill is not None:
            check_stage(stage)
    check_export(cfg)
    accelerator = make_accelerator(cfg)
    run, start, resumed = start_run(cfg, accelerator, resume)

    # --- stages ------------------------------------------------------------------------------
    for index, stage in enumerate(cfg.stages):
        if index < start["stage"]:
            continue
        first_step = start["step"] if index == start["stage"] else 0
        mid_stage = resumed if index == start["stage"] and first_step > 0 else None
        st = prepare_stage(run, index, stage, mid_stage, start.get("ema_updates", 0))
        bar = run.log.progress(stage.steps, first_step, desc=stage.name, enabled=progress)
        for step in range(first_step, stage.steps):
            row = train_step(run, st, step)
            if row is None:  # non-finite loss: step skipped
                continue
            bar.update(1, loss=row["loss"], ips=row["images_per_s"])
            after_step(run, st, step, row)
            if on_step is not None:
                on_step(run.global_step)
        bar.close()
        accelerator.wait_for_everyone()

    # --- export ------------------------------------------------------------------------------
    final = run.run_dir / "final"
    if accelerator.is_main_process:
        if cfg.stages[-1].distill is not None:  # a LoRA bundle or a folder with its defaults
            export_student(run.parts, cfg, run.run_dir, final, st.distiller.teacher_unet)
        else:
            export_model(run.parts, final, cfg.export_dtype)
        run.log.info(f"exported {final}")
    accelerator.wait_for_everyone()
    run.log.close()
    return final


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """accelerate's Accelerator for the run's mixed precision; DDP is told that parameters may
    get no gradient when a text encoder trains (SDXL reads CLIP-L's penultimate layer, so its
    last layer never takes part in the loss)."""
    trains_text = any(
        any(n.startswith("text_encoder") for n in s.train)
        or (s.method == "lora" and s.lora.text_encoder)
        for s in cfg.stages
    )
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if trains_text else []
    return Accelerator(mixed_precision=cfg.mixed_precision, kwargs_handlers=handlers)


def start_run(cfg: TrainConfig, accelerator, resume: bool) -> tuple[Run, dict, tuple | None]:
    """Run folder, log, start model on its device (accelerated), and the resume point.

    Returns the run, the start {stage, step, global_step, ...} and, when resuming, the
    checkpoint's (weights, optimizer state) for a stage resumed mid-way.
    """
    run_dir = Path(cfg.output_dir)
    if (run_dir / "final").exists():  # the export would refuse it: say so before training
        raise LdmError(f"{run_dir / 'final'}: already exists (choose a new output_dir)")
    log = RunLog(run_dir, enabled=accelerator.is_main_process)
    log.save_config(cfg)
    parts = load_start_model(cfg)
    start = {"stage": 0, "step": 0, "global_step": 0}
    resume_from = ckpt.latest_checkpoint(run_dir) if resume else None
    resumed = None  # (weights, optimizer state) of the checkpoint we continue from
    changed = set()
    if resume_from is not None:
        weights, optimizer_state, start = ckpt.load_checkpoint(resume_from)
        resumed = (weights, optimizer_state)
        # checkpoints before this rule held every part: all of them count as changed
        changed = set(start.get("changed", model_parts(parts)))
        if "vae_scaling_factor" in start:
            parts.vae.config.scaling_factor = start["vae_scaling_factor"]
        if start["step"] == 0:  # a stage boundary: plain module names, load right away
            load_part_weights(parts, weights)
        log.info(f"resuming from {resume_from} (stage {start['stage']}, step {start['step']})")
        log.resume_at(start["global_step"])
    device = accelerator.device
    for name in model_parts(parts):
        getattr(parts, name).to(device)
    dtype = DTYPES.get(cfg.mixed_precision, torch.float32)  # autocast's compute dtype
    decision = accel.apply(parts.unet, cfg.accel, device=device, dtype=dtype, training=True)
    if not cfg.channels_last:  # ldm-cpu's routes work in either layout; it picks channels_last
        parts.unet.to(memory_format=torch.contiguous_format)
    log.info(f"accelerator: {decision.mode} ({decision.reason})")
    run = Run(cfg, accelerator, parts, log, run_dir, start["global_step"], changed)
    return run, start, resumed


def prepare_stage(
    run: Run, index: int, stage: StageConfig, resumed: tuple | None, ema_updates: int
) -> Stage:
    """Freeze / unfreeze (or add LoRA), optimizer, EMA, mid-stage resume, data, denoiser."""
    parts, accelerator = run.parts, run.accelerator
    distiller = None
    if stage.distill is not None:  # before set_trainable: a full student copies its teacher
        distiller = Distiller(stage.distill, parts, stage.method)
    with torch.random.fork_rng(devices=[]):  # LoRA's random lora_A: from the run's seed only
        torch.manual_seed(step_generator(run.cfg.seed, index, -1, 0).initial_seed())
        trained = set_trainable(parts, stage, run.cfg.gradient_checkpointing)
    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, stage)
    emas = {n: EMA(m, stage.ema.decay, stage.ema.warmup) for n, m in trained.items()}
    if not stage.ema.enabled:
        emas = {}
    if resumed is not None:
        weights, optimizer_state = resumed  # mid-stage: names may include LoRA layers
        load_part_weights(parts, weights)
        optimizer.load_state_dict(optimizer_state)
        for n, e in emas.items():
            e.load_state_dict({"num_updates": ema_updates, "shadow": weights[f"ema-{n}"]})
    # the VAE trains through a round-trip module so that DDP sees one forward call
    wrapped = {n: accelerator.prepare(AutoencoderRoundTrip(m) if n == "vae" else m)
               for n, m in trained.items()}  # fmt: skip
    optimizer = accelerator.prepare(optimizer)
    # after a resume's weights (latent caches use the trained VAE); teacher samples: the teacher
    data = stage_batches(run.cfg, stage, parts, accelerator.process_index,
                         accelerator.num_processes, run.log, distiller)  # fmt: skip
    text = TrainingText(parts, trained, wrapped, run.cfg.clip_skip, data.config.aesthetic_score)
    if data.config.cache_text and "vae" not in trained:
        written = text.precompute(data.all_captions(), run.run_dir / "cache" / "text")
        run.log.info(f"text cache: {written} new entries in {run.run_dir / 'cache' / 'text'}")
    accelerator.wait_for_everyone()  # every process's share of the caches is on disk
    denoiser = training_denoiser(wrapped.get("unet", parts.unet), parts, stage)
    if distiller is not None:
        distiller.attach(denoiser)
        if resumed is not None:
            distiller.load_state_tensors(resumed[0], ema_updates)
    run.log.info(f"stage '{stage.name}': training {', '.join(trained)} for {stage.steps} steps")
    return Stage(index, stage, trained, wrapped, params, optimizer, emas, data, denoiser, text,
                 distiller)  # fmt: skip


def train_step(run: Run, st: Stage, step: int) -> dict | None:
    """One optimizer step over gradient-accumulation micro-batches; its log row, or None when
    the loss was non-finite and the step was skipped."""
    stage, accelerator, device = st.config, run.accelerator, run.device
    t0 = time.perf_counter()
    for group in st.optimizer.param_groups:
        group["lr"] = lr_at(step, stage)

    # --- forward / backward over gradient-accumulation micro-batches -------------------------
    total, metrics = 0.0, {}
    for micro in range(stage.gradient_accumulation):
        index = step * stage.gradient_accumulation + micro
        g = step_generator(run.cfg.seed, st.index, index, accelerator.process_index)
        with accelerator.autocast(), attention_kernels(device, run.cfg.mixed_precision):
            if "vae" in st.trained:
                loss, metrics = autoencoder_loss_for_step(run.parts, st, g, index, device)
            elif st.distiller is not None:
                loss, metrics = distill_loss_for_step(run.parts, st, g, index, device)
            else:
                loss, metrics = diffusion_loss_for_step(run.parts, st, g, index, device)
        loss = loss / stage.gradient_accumulation
        # gradient checkpointing recomputes forwards inside backward: same kernels as the forward
        with attention_kernels(device, run.cfg.mixed_precision):
            accelerator.backward(loss)
        total += loss.item()

    # --- non-finite guard, clip, step, EMA ---------------------------------------------------
    if not math.isfinite(total):
        st.nonfinite += 1
        st.optimizer.zero_grad(set_to_none=True)
        run.log.info(f"step {step}: non-finite loss, step skipped")
        if not stage.loss.skip_nonfinite or st.nonfinite >= stage.loss.max_nonfinite:
            raise LdmError(f"training stopped: loss was non-finite {st.nonfinite} time(s)")
        return None
    st.nonfinite = 0
    grad_norm = accelerator.clip_grad_norm_(st.params, stage.optim.grad_clip)
    st.optimizer.step()
    st.optimizer.zero_grad(set_to_none=True)
    for n, e in st.emas.items():
        e.update(parts_module(run.parts, n))
    if st.distiller is not None:
        st.distiller.after_step()  # the target network's EMA
    run.global_step += 1

    seconds = time.perf_counter() - t0
    images = stage.batch_size * stage.gradient_accumulation * accelerator.num_processes
    return {"stage": stage.name, "step": step + 1, "loss": total,
            "lr": st.optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
            "images_per_s": images / seconds, **metrics}  # fmt: skip


def after_step(run: Run, st: Stage, step: int, row: dict) -> None:
    """Log the row; at the stage's end hand its results on; checkpoint and validate when due."""
    cfg, stage = run.cfg, st.config
    done = step + 1 == stage.steps
    if (step + 1) % cfg.log_every == 0 or done:
        run.log.row(run.global_step, row)
    if done:
        finish_stage(run, st)
    if run.is_main and (done or (step + 1) % cfg.checkpoint_every == 0):
        save_checkpoint(run, st, step, done)
    if run.is_main and (done or (cfg.validate_every and (step + 1) % cfg.validate_every == 0)):
        run.log.validate(run.parts, cfg, stage, run.global_step, st.emas, st.data)


def finish_stage(run: Run, st: Stage) -> None:
    """What later stages and the export see: EMA weights (export_ema), merged LoRA, and the
    VAE's calibrated latent scale."""
    parts, stage = run.parts, st.config
    if run.cfg.export_ema:
        for n, e in st.emas.items():
            e.copy_to(parts_module(parts, n))
    if stage.method == "lora":
        if run.is_main:
            for f in save_lora(parts, run.run_dir / f"lora-{stage.name}"):
                run.log.info(f"saved LoRA {f}")
        for n in st.trained:  # later stages and the export see plain weights
            merge_lora(parts_module(parts, n))
    if "vae" in st.trained:
        calibrate_latent_scale(parts, st.data, run.device, run.log)
    run.changed.update(st.trained)


def save_checkpoint(run: Run, st: Stage, step: int, done: bool) -> None:
    """Weights (+ EMA and optimizer mid-stage) and the counters a resume continues from."""
    parts, emas = run.parts, st.emas
    state = {"stage": st.index + 1 if done else st.index, "step": 0 if done else step + 1,
             "global_step": run.global_step,
             "ema_updates": max((e.num_updates for e in emas.values()), default=0),
             "vae_scaling_factor": parts.vae.config.scaling_factor,
             "changed": sorted(run.changed)}  # fmt: skip
    weights = {}
    for n in model_parts(parts):
        # (at a stage's end its parts are in run.changed: finish_stage ran first)
        if n in run.changed or (n in st.trained and st.config.method == "full"):
            weights[n] = parts_module(parts, n).state_dict()
        elif n in st.trained:  # LoRA on a part no stage has changed: LoRA only
            sd = parts_module(parts, n).state_dict()
            weights[n] = {k: v for k, v in sd.items() if LORA_KEY in k}
    if not done:
        weights.update({f"ema-{n}": e.shadow for n, e in emas.items()})
        if st.distiller is not None:
            weights.update(st.distiller.state_tensors())
    optimizer_state = {} if done else st.optimizer.state_dict()
    ckpt.save_checkpoint(
        run.run_dir, run.global_step, weights, optimizer_state, state, run.cfg.keep_checkpoints
    )


def parts_module(parts, name: str) -> torch.nn.Module:
    return getattr(parts, name)


LORA_KEY = ".lora_"  # peft's lora_A / lora_B / lora_magnitude_vector


def load_part_weights(parts, weights: dict) -> None:
    """A checkpoint's parts (absent: unchanged from the start model); a LoRA stage's part
    holds its LoRA layers only, over the start model's frozen weights."""
    for name in model_parts(parts):
        sd, module = weights.get(name), getattr(parts, name)
        if sd is None:
            continue
        if sd and all(LORA_KEY in k for k in sd):
            missing, unexpected = module.load_state_dict(sd, strict=False)
            if unexpected or any(LORA_KEY in k for k in missing):
                raise CheckpointError(f"{name}: the checkpoint's LoRA layers do not fit the model")
        else:
            module.load_state_dict(sd, strict=True)
