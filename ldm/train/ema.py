"""Exponential moving average of weights, with the warm-up used by diffusers' EMAModel."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copies of a module's trainable parameters.

    decay_t = min(decay, (1 + t) / (10 + t)) with warm-up, so early averages do not drag the
    random initialisation along for thousands of steps.
    """

    def __init__(self, module: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.decay = decay  # asymptotic decay
        self.warmup = warmup  # use the (1 + t) / (10 + t) ramp
        self.num_updates = 0  # optimizer steps averaged so far
        self.shadow = {
            n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad
        }

    def current_decay(self) -> float:
        t = self.num_updates
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.current_decay()
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)
