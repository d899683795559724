"""A run folder's outputs: resolved config, text log, CSV + TensorBoard metrics, progress bar,
validation grids."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ldm.config import save_config
from ldm.grid import image_grid
from ldm.infotext import save_png
from ldm.io import atomic_path
from ldm.pipeline import Pipeline
from ldm.train.model import stage_parts
from ldm.train.student import student_defaults


class _Bar:
    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled,
                        dynamic_ncols=True, file=sys.stderr)  # fmt: skip

    def update(self, n: int, loss: float, ips: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}", refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class RunLog:
    """Everything a run writes besides checkpoints; only the main process writes."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir = Path(run_dir)  # the run folder
        self.enabled = enabled  # False on non-main processes
        self._csv = None
        self._tb = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._text = open(self.run_dir / "train.log", "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional; the CSV log always exists
                self._tb = None

    def save_config(self, cfg) -> None:
        if self.enabled:
            save_config(cfg, self.run_dir / "config.yaml")

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, file=sys.stderr, flush=True)
        self._text.write(line + "\n")
        self._text.flush()

    def resume_at(self, global_step: int) -> None:
        """Drop metrics.csv rows past ``global_step`` (logged after the checkpoint a resume
        continues from, and about to be logged again), rewriting the file atomically."""
        path = self.run_dir / "metrics.csv"
        if not self.enabled or not path.exists():
            return
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= global_step]
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(kept)

    def row(self, global_step: int, row: dict) -> None:
        if not self.enabled:
            return
        path = self.run_dir / "metrics.csv"
        if self._csv is None:
            new = not path.exists()
            self._csv_file = open(path, "a", newline="", encoding="utf-8")
            self._csv = csv.DictWriter(
                self._csv_file, fieldnames=["global_step", *row], extrasaction="ignore"
            )
            if new:
                self._csv.writeheader()
        self._csv.writerow({"global_step": global_step, **row})
        self._csv_file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{row['stage']}/{k}", v, global_step)

    def progress(self, total: int, initial: int, desc: str, enabled: bool) -> _Bar:
        return _Bar(total, initial, desc, enabled and self.enabled)

    @torch.no_grad()
    def validate(self, parts, cfg, stage, global_step: int, emas: dict, data) -> Path | None:
        """A grid at fixed prompts and seeds (diffusion stages) or reconstructions (VAE)."""
        device = next(parts.unet.parameters()).device
        names = ("vae", "unet", "text_encoder", "text_encoder_2")
        modules = [m for n in names if (m := getattr(parts, n, None)) is not None]
        trainable = [(p, p.requires_grad) for m in modules for p in m.parameters()]
        backups = {}
        for n, e in emas.items():  # sample with the EMA weights, then put the raw ones back
            module = getattr(parts, n)
            backups[n] = {k: v.detach().clone() for k, v in module.state_dict().items()}
            e.copy_to(module)
        try:
            if "vae" in stage.train:
                pixels, _ = data.images(20_000_000)
                pixels = pixels[:8].to(device)
                recon = parts.vae.decode(parts.vae.encode(pixels, sample=False)).clamp(-1, 1)
                images = [_to_pil(x) for x in torch.cat([pixels, recon])]
                columns = len(pixels)
            elif cfg.validation_prompts:
                images, columns = self._sample_grid(parts, cfg, stage, data, device)
                if not images:
                    return None
            else:
                return None
        finally:
            for n, sd in backups.items():
                getattr(parts, n).load_state_dict(sd)
            for p, flag in trainable:  # the pipeline freezes what it is given
                p.requires_grad_(flag)
            for n in stage_parts(parts, stage):
                getattr(parts, n).train()
        path = self.run_dir / "samples" / f"{stage.name}-{global_step:08d}.png"
        save_png(image_grid(images, columns), path, f"validation {stage.name} step {global_step}",
                 {"prompts": cfg.validation_prompts, "step": global_step})  # fmt: skip
        self.info(f"validation grid: {path}")
        return path

    def _sample_grid(self, parts, cfg, stage, data, device) -> tuple[list, int]:
        """The validation prompts at the run's sampler settings; a distill stage's student at its
        defaults (``student_defaults``), one row per step count (distill.student_steps)."""
        res = data.config.resolution
        pipe = Pipeline(parts, device, torch.float32, accel="off")  # training weights: no packing
        prompts = cfg.validation_prompts
        seeds = [cfg.validation_seed] * len(prompts)
        runs = [dict(steps=cfg.validation_steps, guidance_scale=cfg.validation_guidance)]
        if stage.distill is not None:
            student = student_defaults(stage)
            runs = [{**student, "steps": n} for n in stage.distill.student_steps]
        images = []
        for settings in runs:
            outs = pipe(prompts, seeds, height=res, width=res, **settings)
            images += [o.image for o in outs]
        return images, len(prompts) if stage.distill is not None else min(8, len(prompts))

    def close(self) -> None:
        if self.enabled:
            self._text.close()
            if self._csv is not None:
                self._csv_file.close()
            if self._tb is not None:
                self._tb.close()


def _to_pil(x: torch.Tensor):
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)
