"""The optimizer of a stage (AdamW, Loshchilov & Hutter 2019; bitsandbytes' 8-bit AdamW when
asked and installed) and its learning-rate schedule (warm-up, then constant / cosine / linear)."""

from __future__ import annotations

import math

import torch

from ldm.train.adamw import AdamW
from ldm.train.config import StageConfig


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
