"""CPU GEMM routes for linear layers: which library (MKL or oneDNN) and which operand order.

Few rows against a large weight are bound by streaming the weight from memory, which MKL does
faster with the weight as the left operand: ``(W @ x.T + b).T``. MKL runs fp32 GEMMs at half speed
on non-Intel x86 CPUs, so there products go to oneDNN (its inner product, or its 1x1 convolution
under autograd, with ``InnerProduct`` giving few-row products a oneDNN backward). No rule looks at
the batch size, so a result cannot depend on how images were batched. ``Linear`` is the module
``ldm.accel.cpu`` swaps in for ``nn.Linear``. Measurements: docs/benchmarks.md ("ldm-cpu routes").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

WEIGHT_FIRST_MAX_ROWS = 64  # tokens (or output positions) per image: an 8x8 latent
# bf16 GEMMs gain nothing weight-first at 64 rows, and the transposed result costs a copy
WEIGHT_FIRST_MAX_ROWS_BF16 = 32
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


def _linear_pointwise():
    """oneDNN's inner-product op (what inductor uses on the CPU), or None without oneDNN."""
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


ONEDNN_MATMUL = _linear_pointwise()


def nhwc_rows(t: torch.Tensor) -> torch.Tensor:
    """(M, C) rows as a (1, C, 1, M) channels_last view: the pixels of a 1x1 convolution."""
    return t.view(1, 1, *t.shape).permute(0, 3, 1, 2)


def inner_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``x @ weight.T + bias`` for x (M, K) by oneDNN's inner product (no autograd)."""
    return ONEDNN_MATMUL(x, weight, bias, "none", [], "")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``x @ weight.T + bias`` for x (M, K) as oneDNN's 1x1 convolution over an NHWC view."""
    out = F.conv2d(nhwc_rows(x), weight.view(*weight.shape, 1, 1), bias)  # (1, N, 1, M), NHWC
    return out.permute(0, 2, 3, 1).reshape(x.shape[0], weight.shape[0])  # a view


def conv1x1_grad_input(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """``grad @ weight`` (M, K) as the backward-data pass of ``onednn_linear``'s convolution,
    which reads the (N, K) weight in place."""
    grad_x = torch.ops.aten.convolution_backward(  # 1x1, stride 1: (1, K, 1, M)
        nhwc_rows(grad), nhwc_rows(x), weight.view(*weight.shape, 1, 1), None, [1, 1], [0, 0],
        [1, 1], False, [0, 0], 1, [True, False, False],
    )[0]  # fmt: skip
    return grad_x.permute(0, 2, 3, 1).reshape(x.shape)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will differentiate through a product of these (None: no bias)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def onednn_matmul_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether oneDNN's inner product can run it: fp32 on the CPU, no autocast."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (
        ONEDNN_MATMUL is not None
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not torch.is_autocast_enabled("cpu")
    )


class InnerProduct(torch.autograd.Function):
    """``x @ weight.T + bias`` for x (M, K) by oneDNN's inner product, with a oneDNN backward.

    grad_x = grad @ W is the backward-data pass of the equivalent 1x1 convolution (which reads W
    in place; the inner product would need W transposed); grad_W = grad^T @ x is an inner
    product of the transposed rows, small copies when M is small (the only use, see
    ``matmul_rows``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return inner_product(x, weight, bias)

    @staticmethod
    @once_differentiable  # the inner product has no derivative: no double backward
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = conv1x1_grad_input(grad, x, weight)
        if ctx.needs_input_grad[1]:  # (N, M) rows against a (K, M) "weight": (N, K)
            grad_weight = inner_product(grad.t().contiguous(), x.t().contiguous())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


def weight_first(rows_per_image: int, weight: torch.Tensor) -> bool:
    """Whether a product with this many rows per image runs as ``(W @ x.T).T`` (CPU only)."""
    most = WEIGHT_FIRST_MAX_ROWS_BF16 if weight.dtype == torch.bfloat16 else WEIGHT_FIRST_MAX_ROWS
    return (
        weight.device.type == "cpu"
        and rows_per_image <= most
        and weight.numel() >= WEIGHT_FIRST_MIN_ELEMENTS
    )


def addmm_weight_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``x @ weight.T + bias`` for x (M, K), weight (N, K), computed as ``(weight @ x.T + b).T``.

    Returns (M, N) with transposed strides: a view of the contiguous (N, M) result.
    """
    out = weight @ x.t() if bias is None else torch.addmm(bias[:, None], weight, x.t())
    return out.t()


def matmul_rows(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows_per_image: int
) -> torch.Tensor:
    """``x @ weight.T + bias`` for x (M, K) by the route the module note describes.

    Returns (M, N), row-major or (weight-first) with transposed strides.
    """
    if PREFER_ONEDNN and weight.device.type == "cpu":
        if onednn_matmul_ok(x, weight, bias):  # fp32
            # the inner product reads a bias densely, whatever its strides (a parameter's: no-op)
            bias = None if bias is None else bias.contiguous()
            if not needs_grad(x, weight, bias):
                return inner_product(x, weight, bias)
            if (
                0 < x.shape[0]
                and rows_per_image <= WEIGHT_FIRST_MAX_ROWS
                and weight.is_contiguous()
            ):
                return InnerProduct.apply(x.contiguous(), weight, bias)  # oneDNN both ways
        if rows_per_image > WEIGHT_FIRST_MAX_ROWS and (
            needs_grad(x, weight, bias) or torch.is_autocast_enabled("cpu")
        ):  # autograd or autocast: the convolution has a backward and takes bf16; bf16
            return onednn_linear(x, weight, bias)  # weights without either: F.linear, faster
        if needs_grad(x, weight, bias):  # few rows under autograd, not InnerProduct's (bf16, a
            return F.linear(x, weight, bias)  # strided weight, no rows): MKL x-first
    if weight_first(rows_per_image, weight):
        return addmm_weight_first(x, weight, bias)
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear`` on tokens (..., L, K) or one vector per image (B, K) (the time embedding),
    by the route the module note describes."""
    if x.dim() < 2:
        return F.linear(x, weight, bias)
    rows_per_image = x.shape[-2] if x.dim() >= 3 else 1
    out = matmul_rows(x.reshape(-1, x.shape[-1]), weight, bias, rows_per_image)
    # contiguous again (weight-first: a small copy, few rows): the layout F.linear gives
    return out.contiguous().view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters) routed by ``linear`` (see the module note)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
