"""The training loop: stages of (VAE | U-Net | text encoder) training, read top to bottom.

Randomness is a pure function of (seed, stage, step, rank): each step makes its own generator,
so resuming from a checkpoint needs only weights, optimizer, EMA and the step counter to continue
exactly as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ldm.errors import LdmError
from ldm.sampling.schedules import NoiseSchedule
from ldm.train import checkpoint as ckpt
from ldm.train.adamw import AdamW
from ldm.train.config import StageConfig, TrainConfig
from ldm.train.ema import EMA
from ldm.train.loss import (
    add_noise,
    autoencoder_loss,
    diffusion_loss,
    diffusion_target,
    min_snr_weight,
    training_noise,
)
from ldm.train.runlog import RunLog

PARTS = ("vae", "unet", "text_encoder")


def step_generator(seed: int, stage: int, step: int, rank: int) -> torch.Generator:
    """The one source of randomness for a training step (tuple hashes of ints are stable)."""
    return torch.Generator().manual_seed(hash((seed, stage, step, rank)) & (2**63 - 1))


def lr_at(step: int, stage: StageConfig) -> float:
    """Linear warm-up, then constant / cosine / linear decay to min_lr_ratio."""
    o = stage.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, stage.steps - o.warmup_steps)
    if o.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    elif o.schedule == "linear":
        factor = 1 - min(progress, 1.0)
    else:
        return o.lr
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * factor)


def make_optimizer(params: list[torch.nn.Parameter], stage: StageConfig) -> torch.optim.Optimizer:
    o = stage.optim
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    if o.use_8bit:
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kwargs)
        except ImportError:
            pass  # documented fallback: plain AdamW when bitsandbytes is not installed
    return AdamW(params, **kwargs)  # torch's, fused (ldm/train/adamw.py)


def attention_kernels(device: torch.device, mixed_precision: str):
    """SDPA kernels for a training forward: on the CPU in bf16, the math kernel.

    The CPU flash kernel's bf16 backward took 320 ms of a 1.0 s demo-model step (measured,
    torch 2.14); the math kernel (softmax(QK^T/sqrt(d))V from plain ops, Vaswani et al. 2017)
    made the step 1.2x faster. fp32 keeps the flash kernel, which is faster there.
    """
    if device.type == "cpu" and mixed_precision == "bf16":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def text_context(parts, encoder, captions: list[str], device, grad: bool) -> torch.Tensor:
    """CLIP last hidden state (final layer norm applied), as the U-Net's cross-attention input."""
    tok = parts.tokenizer(
        captions, padding="max_length", truncation=True,
        max_length=parts.tokenizer.model_max_length, return_tensors="pt",
    )  # fmt: skip
    with torch.set_grad_enabled(grad):
        return encoder(tok.input_ids.to(device)).last_hidden_state


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> Path:
    """Run every stage of ``cfg``; return the exported model folder."""
    from accelerate import Accelerator

    from ldm.train.model import load_start_model, set_trainable, stage_batches

    # --- run folder, accelerator, model -------------------------------------------------
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    run_dir = Path(cfg.output_dir)
    if (run_dir / "final").exists():  # the export would refuse it: say so before training
        raise LdmError(f"{run_dir / 'final'}: already exists (choose a new output_dir)")
    log = RunLog(run_dir, enabled=accelerator.is_main_process)
    log.save_config(cfg)
    parts = load_start_model(cfg)
    start = {"stage": 0, "step": 0, "global_step": 0}
    resume_from = ckpt.latest_checkpoint(run_dir) if resume else None
    resumed = None  # (weights, optimizer state) of the checkpoint we continue from
    if resume_from is not None:
        weights, optimizer_state, start = ckpt.load_checkpoint(resume_from)
        resumed = (weights, optimizer_state)
        if "vae_scaling_factor" in start:
            parts.vae.config.scaling_factor = start["vae_scaling_factor"]
        if start["step"] == 0:  # a stage boundary: plain module names, load right away
            load_part_weights(parts, weights)
        log.info(f"resuming from {resume_from} (stage {start['stage']}, step {start['step']})")
    for name in PARTS:
        getattr(parts, name).to(device)
    if not cfg.channels_last:
        parts.unet.to(memory_format=torch.contiguous_format)
    global_step = start["global_step"]

    for stage_index, stage in enumerate(cfg.stages):
        if stage_index < start["stage"]:
            continue
        first_step = start["step"] if stage_index == start["stage"] else 0

        # --- what trains, optimizer, EMA --------------------------------------------------
        trained = set_trainable(parts, stage, cfg.gradient_checkpointing)
        params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, stage)
        emas = {n: EMA(m, stage.ema.decay, stage.ema.warmup) for n, m in trained.items()}
        if not stage.ema.enabled:
            emas = {}
        if resumed is not None and stage_index == start["stage"] and first_step > 0:
            weights, optimizer_state = resumed  # mid-stage: names may include LoRA layers
            load_part_weights(parts, weights)
            optimizer.load_state_dict(optimizer_state)
            for n, e in emas.items():
                e.load_state_dict(
                    {"num_updates": start["ema_updates"], "shadow": weights[f"ema-{n}"]}
                )
        # the VAE trains through a round-trip module so that DDP sees one forward call
        wrapped = {n: accelerator.prepare(AutoencoderRoundTrip(m) if n == "vae" else m)
                   for n, m in trained.items()}  # fmt: skip
        optimizer = accelerator.prepare(optimizer)
        data = stage_batches(cfg, stage, parts, rank, world, log)
        schedule = NoiseSchedule.from_scheduler_config(parts.scheduler_config)
        prediction = stage.loss.prediction_type or schedule.prediction_type
        nonfinite = 0
        log.info(f"stage '{stage.name}': training {', '.join(trained)} for {stage.steps} steps")

        bar = log.progress(stage.steps, first_step, desc=stage.name, enabled=progress)
        for step in range(first_step, stage.steps):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, stage)

            # --- forward / backward over gradient-accumulation micro-batches -------------
            total, metrics = 0.0, {}
            for micro in range(stage.gradient_accumulation):
                g = step_generator(
                    cfg.seed, stage_index, step * stage.gradient_accumulation + micro, rank
                )
                index = step * stage.gradient_accumulation + micro
                with accelerator.autocast(), attention_kernels(device, cfg.mixed_precision):
                    if "vae" in trained:
                        pixels, _ = data.images(index)
                        pixels = pixels.to(device)
                        eps = torch.randn(
                            (
                                pixels.shape[0],
                                parts.vae.latent_channels,
                                pixels.shape[2] // parts.vae.factor,
                                pixels.shape[3] // parts.vae.factor,
                            ),
                            generator=g,
                        )
                        recon, mean, logvar = wrapped["vae"](pixels, eps.to(device))
                        loss, metrics = autoencoder_loss(
                            recon, pixels, mean, logvar, stage.loss.kl_weight
                        )
                    else:
                        loss, metrics = diffusion_loss_for_step(
                            parts, wrapped, data, stage, schedule, prediction, g, index, device
                        )
                loss = loss / stage.gradient_accumulation
                accelerator.backward(loss)
                total += loss.item()

            # --- non-finite guard, clip, step, EMA ---------------------------------------
            if not math.isfinite(total):
                nonfinite += 1
                optimizer.zero_grad(set_to_none=True)
                log.info(f"step {step}: non-finite loss, step skipped")
                if not stage.loss.skip_nonfinite or nonfinite >= stage.loss.max_nonfinite:
                    raise LdmError(f"training stopped: loss was non-finite {nonfinite} time(s)")
                continue
            nonfinite = 0
            grad_norm = accelerator.clip_grad_norm_(params, stage.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for n, e in emas.items():
                e.update(parts_module(parts, n))
            global_step += 1

            # --- logging, checkpoints, validation ----------------------------------------
            seconds = time.perf_counter() - t0
            images_per_s = stage.batch_size * stage.gradient_accumulation * world / seconds
            row = {"stage": stage.name, "step": step + 1, "loss": total,
                   "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                   "images_per_s": images_per_s, **metrics}  # fmt: skip
            bar.update(1, loss=total, ips=images_per_s)
            if (step + 1) % cfg.log_every == 0 or step + 1 == stage.steps:
                log.row(global_step, row)
            done = step + 1 == stage.steps
            if done:
                for n, e in emas.items():  # later stages and the export see the EMA weights
                    e.copy_to(parts_module(parts, n))
                if stage.method == "lora" and accelerator.is_main_process:
                    from ldm.train.lora import save_lora

                    for f in save_lora(parts, run_dir / f"lora-{stage.name}"):
                        log.info(f"saved LoRA {f}")
                if stage.method == "lora":
                    from ldm.train.lora import merge_lora

                    for n in trained:  # later stages and the export see plain weights
                        merge_lora(parts_module(parts, n))
                if "vae" in trained:
                    calibrate_latent_scale(parts, data, device, log)
            if accelerator.is_main_process and (done or (step + 1) % cfg.checkpoint_every == 0):
                state = {"stage": stage_index + 1 if done else stage_index,
                         "step": 0 if done else step + 1, "global_step": global_step,
                         "ema_updates": max((e.num_updates for e in emas.values()), default=0),
                         "vae_scaling_factor": parts.vae.config.scaling_factor}  # fmt: skip
                weights = {n: parts_module(parts, n).state_dict() for n in PARTS}
                if not done:
                    weights.update({f"ema-{n}": e.shadow for n, e in emas.items()})
                ckpt.save_checkpoint(
                    run_dir, global_step, weights, {} if done else optimizer.state_dict(),
                    state, cfg.keep_checkpoints,
                )  # fmt: skip
            if accelerator.is_main_process and (
                done or (cfg.validate_every and (step + 1) % cfg.validate_every == 0)
            ):
                log.validate(parts, cfg, stage, global_step, emas, data)
            if on_step is not None:
                on_step(global_step)
        bar.close()
        accelerator.wait_for_everyone()

    # --- export ----------------------------------------------------------------------------
    final = run_dir / "final"
    if accelerator.is_main_process:
        from ldm.train.model import export_model

        export_model(parts, final, cfg.export_dtype)
        log.info(f"exported {final}")
    accelerator.wait_for_everyone()
    log.close()
    return final


def parts_module(parts, name: str) -> torch.nn.Module:
    return getattr(parts, name)


def load_part_weights(parts, weights: dict) -> None:
    for name in PARTS:
        if name in weights:
            getattr(parts, name).load_state_dict(weights[name], strict=True)


def diffusion_loss_for_step(
    parts, wrapped, data, stage, schedule, prediction, g, step, device
) -> tuple[torch.Tensor, dict]:
    """Sample latents, timesteps and noise for one micro-batch; return the weighted loss."""
    if data.latents is not None:  # cached posterior: sample z = mean + std * eps each step
        stats, captions = data.cached(step)
        z = stats[:, 0] + stats[:, 1] * torch.randn(stats[:, 0].shape, generator=g)
        latents = parts.vae.scale_latents(z.to(device))
    else:
        pixels, captions = data.images(step)
        with torch.no_grad():
            latents = parts.vae.encode(pixels.to(device), generator=g)
    drop = torch.rand(len(captions), generator=g) < data.config.caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    encoder = wrapped.get("text_encoder")
    context = text_context(
        parts, encoder or parts.text_encoder, captions, device, encoder is not None
    )
    b = latents.shape[0]
    t = torch.randint(0, len(schedule.alphas_cumprod), (b,), generator=g)
    cfg = stage.loss
    noise = training_noise(
        tuple(latents.shape), g, cfg.noise_offset,
        cfg.multires_noise_iterations, cfg.multires_noise_discount,
    ).to(device)  # fmt: skip
    ac = schedule.alphas_cumprod
    x_t = add_noise(latents.float(), noise, ac, t).to(latents.dtype)
    pred = wrapped["unet"](x_t, t.to(device), context)
    target = diffusion_target(latents.float(), noise, ac, t, prediction)
    weight = min_snr_weight(ac, t, stage.loss.min_snr_gamma, prediction).to(device)
    return diffusion_loss(pred, target, weight), {}


class AutoencoderRoundTrip(torch.nn.Module):
    """pixels -> posterior -> z = mean + std * eps -> reconstruction, as one forward call."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, eps: torch.Tensor):
        dist = self.vae.encode_dist(pixels)
        recon = self.vae.decode_raw(dist.mean + dist.std * eps)
        return recon, dist.mean, dist.logvar


@torch.no_grad()
def calibrate_latent_scale(parts, data, device, log, batches: int = 4) -> None:
    """Set the VAE's scaling_factor to 1 / std of its latents (Rombach et al. 2022, App. G)."""
    zs = [
        parts.vae.encode_dist(data.images(10_000_000 + i)[0].to(device)).sample()
        for i in range(batches)
    ]
    std = torch.cat(zs).float().std().item()
    parts.vae.config.scaling_factor = 1.0 / std
    log.info(f"latent scaling factor set to {1.0 / std:.5f} (latent std {std:.4f})")
