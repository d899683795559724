"""Rotary position embedding over several axes (RoFormer, Su et al. 2021; FLUX.1's 3-axis form).

Each token has integer ids, one per axis (FLUX: (0, row, col) for image tokens, zeros for text);
the head dimension is split into one slice per axis, and each consecutive pair of channels in an
axis's slice is rotated by the angle id * theta^(-2j / d) (RoFormer eq. 15). The table is
computed in float64 and rounded to float32, and the rotation is done in float32, as diffusers'
FluxPosEmbed and apply_rotary_emb do, so both round alike; the rotation is one complex product
per channel pair (a contiguous pass, several times faster on the CPU than strided real/imaginary
halves).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rope_table(ids: torch.Tensor, axes_dims: Sequence[int], theta: float = 10000.0) -> torch.Tensor:
    """Each token's rotations as unit complex numbers cos + i sin: ids (L, n_axes) -> complex64
    (L, sum(axes) / 2), cos and sin each rounded from float64 to float32.

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
    return torch.complex(angle.cos().float(), angle.sin().float())


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of x (..., L, head_dim) by the table (L, head_dim / 2),
    in float32; the result has x's dtype."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (..., L, head_dim / 2)
    # (real + i imag)(cos + i sin): real cos - imag sin, imag cos + real sin, each product
    # rounded once, as diffusers' x * cos + rotated(x) * sin
    return torch.view_as_real(pairs * table).flatten(-2).to(x.dtype)
