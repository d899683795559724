"""Few-position convolutions as one GEMM (im2col) on the CPU.

oneDNN's convolution is fast with many output positions and slow with few (an SD 1.5 U-Net's
8x8 and 4x4 levels), where im2col + one GEMM (routed by ``ldm.accel.matmul``) runs 2-5x faster.
So a convolution takes the GEMM when its input has at least ``MATMUL_MIN_CHANNELS`` channels and
``MATMUL_CHANNELS_PER_POSITION`` per output position of one image (never a batch-size rule);
any other runs as oneDNN's. ``Conv2d`` is the module ``ldm.accel.cpu`` swaps in for
``nn.Conv2d``. Measurements: docs/benchmarks.md ("ldm-cpu routes").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.accel import matmul

MATMUL_CHANNELS_PER_POSITION = 4  # input channels per output position of one image
MATMUL_MIN_CHANNELS = 512  # the U-Net levels that are slow in oneDNN have 1280


def conv2d_as_matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (groups 1, dilation 1) as im2col + GEMM.

    The patch matrix is built in (kh, kw, Cin) order from an NHWC view of x, so a channels_last
    weight reshapes to (Cout, kh*kw*Cin) without a copy; a contiguous weight uses F.unfold's
    (Cin, kh, kw) order instead, for the same reason. A 1x1 stride-1 convolution needs no patch
    matrix: its rows are the NHWC pixels. The output is returned in the input's layout
    (contiguous or channels_last).
    """
    b, c, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    if kh == kw == 1 and stride == 1 and padding == 0:  # the patches are the pixels (NHWC)
        cols = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view when x is channels_last
        wmat = weight.reshape(cout, c)  # a (Cout, Cin, 1, 1) weight is both layouts at once
    elif weight.is_contiguous():
        cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (B, Cin*kh*kw, L)
        cols = cols.transpose(1, 2).reshape(b * ho * wo, -1)
        wmat = weight.view(cout, -1)
    else:
        xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, padding, padding, padding, padding))
        span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
        patches = [xp[:, i : i + span_h : stride, j : j + span_w : stride]
                   for i in range(kh) for j in range(kw)]  # fmt: skip
        cols = torch.stack(patches, dim=3).reshape(b * ho * wo, -1)  # (B*L, kh*kw*Cin)
        wmat = weight.permute(0, 2, 3, 1).reshape(cout, -1)  # a view for channels_last weights
    out = matmul.matmul_rows(cols, wmat, bias, ho * wo)  # (B*L, Cout), maybe transposed strides
    out = out.view(b, ho, wo, cout).permute(0, 3, 1, 2)  # (B, Cout, Ho, Wo)
    layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    return out.contiguous(memory_format=layout)  # the caller's layout (a no-op when it has it)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters) that takes the GEMM route for few output positions."""

    def _matmul_ok(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu" or x.dim() != 4 or self.groups != 1:
            return False
        if self.dilation != (1, 1) or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return False
        (sh, sw), (ph, pw) = self.stride, self.padding
        if sh != sw or ph != pw:
            return False
        ho = (x.shape[2] + 2 * ph - self.kernel_size[0]) // sh + 1
        wo = (x.shape[3] + 2 * pw - self.kernel_size[1]) // sw + 1
        if matmul.PREFER_ONEDNN and matmul.needs_grad(x, self.weight, self.bias):
            # training where oneDNN is preferred: only products with a oneDNN backward
            # (``matmul.InnerProduct``: fp32, few positions); else the convolution's is faster
            fp32 = matmul.onednn_matmul_ok(x, self.weight, self.bias)
            if not fp32 or ho * wo > matmul.WEIGHT_FIRST_MAX_ROWS:
                return False
        return self.in_channels >= max(MATMUL_MIN_CHANNELS, MATMUL_CHANNELS_PER_POSITION * ho * wo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._matmul_ok(x):
            weight = self.weight
            bias = self.bias
            if torch.is_autocast_enabled("cpu"):  # cast first: im2col then moves bf16, not fp32
                dtype = torch.get_autocast_dtype("cpu")
                x, weight = x.to(dtype), weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
            return conv2d_as_matmul(x, weight, bias, self.stride[0], self.padding[0])
        return super().forward(x)
