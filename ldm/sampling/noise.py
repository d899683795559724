"""Per-sample noise: each image draws from its own torch.Generator, never from the global RNG."""

from __future__ import annotations

from collections.abc import Callable

import torch

NoiseFn = Callable[[], torch.Tensor]


def make_noise(
    generators: list[torch.Generator],  # one per sample; image i of seed s: manual_seed(s + i)
    shape_per_sample: tuple[int, ...],  # (C, H, W)
    device: torch.device | str = "cpu",  # where the noise is used (drawn on the generators' device)
    dtype: torch.dtype = torch.float32,
) -> NoiseFn:
    """A function returning fresh standard-normal noise (B, *shape), row i from generators[i].

    Each row is ``torch.randn((1, *shape), generator=g)``, the draw diffusers makes with a list of
    CPU generators, so a batch equals the same samples drawn one at a time.
    """

    def noise() -> torch.Tensor:
        rows = [
            torch.randn((1, *shape_per_sample), generator=g, device=g.device, dtype=torch.float32)
            for g in generators
        ]
        return torch.cat(rows).to(device=device, dtype=dtype)

    return noise


def require_noise(noise: NoiseFn | None, sampler: str) -> NoiseFn:
    """Stochastic samplers refuse to fall back on the global RNG."""
    if noise is None:
        raise ValueError(f"{sampler} is stochastic: pass noise=make_noise(generators, shape)")
    return noise
