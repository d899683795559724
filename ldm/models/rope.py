"""Rotary position embedding over several axes (RoFormer, Su et al. 2021; FLUX.1's 3-axis form).

Each token has integer ids, one per axis (FLUX: (0, row, col) for image tokens, zeros for text);
the head dimension is split into one slice per axis, and each consecutive pair of channels in an
axis's slice is rotated by the angle id * theta^(-2j / d) (RoFormer eq. 15). The tables are
computed in float64 and rounded to float32, and the rotation is done in float32, as diffusers'
FluxPosEmbed and apply_rotary_emb do, so both round alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (L, head_dim / 2) float32 each


def rope_tables(ids: torch.Tensor, axes_dims: Sequence[int], theta: float = 10000.0) -> Rope:
    """cos and sin of each token's rotation angles: ids (L, n_axes) -> two (L, sum(axes) / 2).

    Pair j of the head dimension belongs to the axis whose slice holds it; within an axis of d
    channels its frequency is theta^(-2j / d) (j counted within the axis).
    """
    if ids.shape[-1] != len(axes_dims):
        raise ValueError(f"ids have {ids.shape[-1]} axes, the model {len(axes_dims)}")
    pos = ids.float().double()  # ids are rounded to float32 first, as diffusers does
    angles = []
    for axis, dim in enumerate(axes_dims):
        exponent = torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim
        freqs = 1.0 / theta**exponent  # (dim / 2,)
        angles.append(torch.outer(pos[:, axis], freqs))  # (L, dim / 2)
    angle = torch.cat(angles, dim=1)  # (L, head_dim / 2)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of x (..., L, head_dim) by the tables' angles, in float32;
    the result has x's dtype."""
    cos, sin = rope  # (L, head_dim / 2): broadcast over the leading axes
    real, imag = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (..., L, head_dim / 2) each
    # (real + i imag) * (cos + i sin), each product rounded as diffusers' x*cos + rot(x)*sin
    rotated = torch.stack([real * cos - imag * sin, imag * cos + real * sin], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
