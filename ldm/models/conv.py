"""A Conv2d that runs low-resolution convolutions as one matmul (im2col) on the CPU.

oneDNN's CPU convolution is fast when there are many output positions and slow when there are
few: on the project's 2-core AVX-512/AMX CPU, a 1280-channel 3x3 convolution over 2 x 8 x 8
positions (an SD 1.5 U-Net's inner blocks at 256x256) runs at 127 GFLOP/s (fp32) and at 2 x 4 x 4
positions at 40 GFLOP/s, against 278 and 176 GFLOP/s for the same product written as
im2col + one GEMM; at 2 x 32 x 32 positions oneDNN wins (342 against 276), and with few channels
it wins at any size (64 x 4 x 4 positions, 192 channels: 350 against 254). The same holds in bf16
and in backward. At 16 x 16 the GEMM still wins when the reduction is long (1280 -> 1280 channels
at batch 2: 262 against 194; 1920 -> 640: 209 against 182) and loses below ~1000 input channels
(960 -> 640: 243 against 256). So a convolution is the GEMM (B*Ho*Wo, k*k*Cin) @ (k*k*Cin, Cout)
when its input has at least ``MATMUL_MIN_CHANNELS`` channels and at least
``MATMUL_CHANNELS_PER_POSITION`` per output position of one image (1024 at 16 x 16, 256 at
8 x 8); any other, oneDNN. The GEMM itself is routed by ``ldm.models.matmul`` (MKL weight-first
for few positions, oneDNN on some CPUs).
Where MKL is the slow library (``ldm.models.matmul.PREFER_ONEDNN``, e.g. a 2-core AMD Zen 5)
the GEMM is oneDNN's inner product, and the same rule holds: forward GFLOP/s, oneDNN convolution
against im2col + inner product, 1280 -> 1280 at 8 x 8 114 against 358, at 4 x 4 30 against 228,
at 16 x 16 267 against 327, 1920 -> 640 at 16 x 16 245 against 234. Under autograd there the
route is taken only where its product is ``matmul.InnerProduct`` (fp32, at most 64 positions per
image), whose backward is oneDNN's too: forward + backward GFLOP/s, oneDNN convolution against
GEMM, 1280 -> 1280 at 8 x 8 144 against 196, at 4 x 4 49 against 105, 2560 -> 1280 at 4 x 4 50
against 111; at 16 x 16 the convolution wins (228 against 181), as it did against im2col + MKL
everywhere (0.57x for 2560 -> 1280 at 8 x 8).
The rule looks at one image, never at the batch size, so the route (and the last bits of the
result) cannot depend on how images were batched.
Figures: ``python scripts/bench_conv.py`` (training: ``--grad --tuned-malloc``); same parameters
and results as ``nn.Conv2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models import matmul

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
