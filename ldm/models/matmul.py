"""Linear layers (and few-position convolutions) on the CPU: which GEMM, in which order.

Weight first. ``x @ W.T`` with few rows (tokens of an 8x8 or 4x4 latent at batch 2: 32-128 rows)
against a large weight (1280 x 11520 for an SD 1.5 inner conv) is limited by streaming the weight
from memory, not by arithmetic: across a whole U-Net forward the 3.4 GB of SD 1.5 weights do not
stay in cache. MKL streams the weight faster when it is the *left* operand, so ldm computes the
same product as ``(W @ x.T + b).T`` and copies the (small) result back to row-major. Measured on
the project's Intel 2-core CPU with 40 distinct 1280 x 11520 weights in turn (so none is cached),
fp32 GFLOP/s, rows x-first -> weight-first: 32 rows 116 -> 165, 64 rows 174 -> 184, 128 rows
209 -> 228, 256 rows 241 -> 258, 512 rows 279 -> 287 (``python scripts/bench_conv.py
--linear``). With a cached weight the two orders tie from 256 rows on, and small weights lose:
the demo model's train step (128-wide layers, 4096 rows) was 11 % slower weight-first, its
batch-8 forward 18 %. So the weight-first order is taken for at most ``WEIGHT_FIRST_MAX_ROWS``
rows *per image* and weights of at least ``WEIGHT_FIRST_MIN_ELEMENTS``. A 2-D input (B, K), such
as the time embedding every ResNet block projects, is one row per image: at batch 2 a cold
1280 x 1280 weight takes 233 us weight-first against 619 us x-first (MKL's path for 2-4 rows
streams the weight at ~9 GB/s); at batch 8 it is the other way round (606 against 503 us), at 16
and 32 weight-first wins again.

oneDNN on other CPUs. ``F.linear`` on the CPU is MKL, and MKL runs its fp32 GEMM at half speed
on AMD CPUs: on a 2-core Zen 5 (family 26) a 4096^2 product ran at 188 GFLOP/s through MKL and
372 through oneDNN, and the SD 1.5 token linears (154-2048 rows) at 160-200 against 230-430
(forward + backward: 175-185 against 230-390). oneDNN is reached through its convolution: a
(M, K) @ (K, N) product is a 1x1 convolution over an NHWC view of the rows, with no copy either
way. On Intel CPUs the two libraries were within 5 % of each other with no consistent winner, so
MKL stays. Products with few rows per image keep MKL (weight-first or not): there oneDNN's 1x1
convolution is the slower one on either CPU (128 x 1280 -> 10240: 120 against 151 GFLOP/s).

Like ``ldm.models.conv``, no rule looks at the batch size, so the route (and the last bits of a
result) cannot depend on how images were batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_FIRST_MAX_ROWS = 64  # tokens (or output positions) per image: an 8x8 latent
WEIGHT_FIRST_MIN_ELEMENTS = 1 << 20  # 4 MiB in fp32, twice a core's L2: a weight read from memory


def cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...), '' where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return ""


# many-row products go to oneDNN where MKL is the slow library: x86 CPUs not made by Intel
PREFER_ONEDNN = cpu_vendor() not in ("", "GenuineIntel")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``x @ weight.T + bias`` for x (M, K) as oneDNN's 1x1 convolution over an NHWC view."""
    m, k = x.shape
    rows = x.view(1, 1, m, k).permute(0, 3, 1, 2)  # (1, K, 1, M), channels_last strides
    out = F.conv2d(rows, weight.view(*weight.shape, 1, 1), bias)  # (1, N, 1, M), channels_last
    return out.permute(0, 2, 3, 1).reshape(m, weight.shape[0])  # a view: out is channels_last


def weight_first(rows_per_image: int, weight: torch.Tensor) -> bool:
    """Whether a product with this many rows per image runs as ``(W @ x.T).T`` (CPU only)."""
    return (
        weight.device.type == "cpu"
        and rows_per_image <= WEIGHT_FIRST_MAX_ROWS
        and weight.numel() >= WEIGHT_FIRST_MIN_ELEMENTS
    )


def mkl_route_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ldm's MKL routes (weight-first, the conv GEMM) may run for this product.

    Not under autograd where oneDNN is preferred: their backward is MKL GEMMs at MKL's speed
    there. On the Zen 5 an SD 1.5 train step was 9 % faster with the conv GEMM route off and 3 %
    with weight-first off, while in the forward they are worth 31 % and 5 %.
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return not (PREFER_ONEDNN and needs_grad)


def addmm_weight_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``x @ weight.T + bias`` for x (M, K), weight (N, K), computed as ``(weight @ x.T + b).T``.

    Returns (M, N) with transposed strides: a view of the contiguous (N, M) result.
    """
    out = weight @ x.t() if bias is None else torch.addmm(bias[:, None], weight, x.t())
    return out.t()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear`` on tokens (..., L, K) or one vector per image (B, K) (the time embedding);
    weight-first when L is small (see the module note)."""
    rows_per_image = x.shape[-2] if x.dim() >= 3 else 1
    if x.dim() >= 2 and weight_first(rows_per_image, weight) and mkl_route_ok(x, weight):
        out = addmm_weight_first(x.reshape(-1, x.shape[-1]), weight, bias)
        # contiguous again (a small copy: few rows), so what follows sees the layout F.linear gives
        return out.contiguous().view(*x.shape[:-1], weight.shape[0])
    if PREFER_ONEDNN and rows_per_image > WEIGHT_FIRST_MAX_ROWS and weight.device.type == "cpu":
        out = onednn_linear(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters) that runs weight-first for few tokens per image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
