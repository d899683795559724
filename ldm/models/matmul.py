"""Linear layers (and few-position convolutions) with the weight as the left GEMM operand.

``x @ W.T`` with few rows (tokens of an 8x8 or 4x4 latent at batch 2: 32-128 rows) against a
large weight (1280 x 11520 for an SD 1.5 inner conv) is limited by streaming the weight from
memory, not by arithmetic: across a whole U-Net forward the 3.4 GB of SD 1.5 weights do not stay
in cache. MKL streams the weight faster when it is the *left* operand, so on the CPU ldm computes
the same product as ``(W @ x.T + b).T`` and copies the (small) result back to row-major.
Measured on the project's 2-core CPU with 40 distinct 1280 x 11520 weights
in turn (so none is cached), fp32 GFLOP/s, rows x-first -> weight-first:
32 rows 116 -> 165, 64 rows 174 -> 184, 128 rows 209 -> 228, 256 rows 241 -> 258, 512 rows
279 -> 287 (``python scripts/bench_conv.py --linear``). With a cached weight the two orders tie
from 256 rows on, and small weights lose: the demo model's train step (128-wide layers, 4096
rows) was 11 % slower weight-first, its batch-8 forward 18 %. So the weight-first order is taken
for at most ``WEIGHT_FIRST_MAX_ROWS`` rows *per image* and weights of at least
``WEIGHT_FIRST_MIN_ELEMENTS``. Like ``ldm.models.conv``, the rule never looks at the batch size,
so the order (and the last bits of a result) cannot depend on how images were batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_FIRST_MAX_ROWS = 64  # tokens (or output positions) per image: an 8x8 latent
WEIGHT_FIRST_MIN_ELEMENTS = 1 << 20  # 4 MiB in fp32, twice a core's L2: a weight read from memory


def weight_first(rows_per_image: int, weight: torch.Tensor) -> bool:
    """Whether a product with this many rows per image runs as ``(W @ x.T).T`` (CPU only)."""
    return (
        weight.device.type == "cpu"
        and rows_per_image <= WEIGHT_FIRST_MAX_ROWS
        and weight.numel() >= WEIGHT_FIRST_MIN_ELEMENTS
    )


def addmm_weight_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``x @ weight.T + bias`` for x (M, K), weight (N, K), computed as ``(weight @ x.T + b).T``.

    Returns (M, N) with transposed strides: a view of the contiguous (N, M) result.
    """
    out = weight @ x.t() if bias is None else torch.addmm(bias[:, None], weight, x.t())
    return out.t()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear`` on tokens (..., L, K); weight-first when L is small (see the module note)."""
    if x.dim() >= 3 and weight_first(x.shape[-2], weight):
        out = addmm_weight_first(x.reshape(-1, x.shape[-1]), weight, bias)
        # contiguous again (a small copy: few rows), so what follows sees the layout F.linear gives
        return out.contiguous().view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters) that runs weight-first for few tokens per image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
