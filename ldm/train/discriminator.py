"""A small text-conditioned discriminator on clean latents, for adversarial distillation.

The adversarial term of a distill stage (``distill.adversarial``; ldm.train.distill) in the
manner of ADD (Sauer et al. 2023, "Adversarial Diffusion Distillation"): the student's x0
estimates are the fakes, the data latents the reals, hinge losses (Lim & Ye 2017). Consistency
distillation alone regresses to the mean where the first step of a 1-2 step sample is uncertain
(blended colours, faded objects); a discriminator penalises exactly what data never shows.

The network is a projection discriminator (Miyato & Koyama 2018): a strided conv stack with
spectral norm, pooled to a 4 x 4 grid so that layout counts, and a logit
D(x, c) = psi(h) + <h, E c>, c the prompt's token embeddings averaged (any family's text width).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

GRID = 4  # the pooled layout the head sees


class LatentDiscriminator(nn.Module):
    def __init__(self, channels: int, text_dim: int, width: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            spectral_norm(nn.Conv2d(channels, w, 3, padding=1)),
            nn.SiLU(),
            spectral_norm(nn.Conv2d(w, 2 * w, 4, stride=2, padding=1)),
            nn.SiLU(),
            spectral_norm(nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1)),
            nn.SiLU(),
        )
        self.head = spectral_norm(nn.Linear(4 * w * GRID * GRID, 4 * w))
        self.out = spectral_norm(nn.Linear(4 * w, 1))
        self.embed = spectral_norm(nn.Linear(text_dim, 4 * w))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w) clean latents, text (B, D) pooled prompt embeddings -> (B,) logits."""
        h = F.adaptive_avg_pool2d(self.body(x.float()), GRID).flatten(1)
        h = F.silu(self.head(h))
        return self.out(h).squeeze(1) + (h * self.embed(text.float())).sum(1)


def pooled_text(context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L, D) token embeddings -> (B, D): their mean over real tokens (all when no mask)."""
    if mask is None:
        return context.float().mean(1)
    m = mask.to(torch.float32).unsqueeze(-1)
    return (context.float() * m).sum(1) / m.sum(1).clamp(min=1)


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss: mean relu(1 - D(real)) + mean relu(1 + D(fake))."""
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()


def generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """The generator's hinge term: -mean D(fake)."""
    return -d_fake.mean()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An Adam state as flat tensors ("<param index>.<name>") for a safetensors checkpoint."""
    state = optimizer.state_dict()["state"]
    return {f"{i}.{k}": torch.as_tensor(v) for i, s in state.items() for k, v in s.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict) -> None:
    """Inverse of ``optimizer_tensors`` (the hyperparameters are the optimizer's own)."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
