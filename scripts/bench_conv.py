"""Time oneDNN's convolution against ldm's im2col GEMM route for U-Net-shaped convolutions.

Prints GFLOP/s of ``F.conv2d`` and of ``ldm.accel.conv.conv2d_as_matmul`` (forward, or forward
+ backward with ``--grad``; fp32, or bf16 with ``--bf16``) for the shapes an SD 1.5 U-Net and the
demo model meet; the crossover sets ``ldm.accel.conv``'s routing rule. ``--linear`` instead
times x @ W.T against the weight-first (W @ x.T).T of ``ldm.accel.matmul`` for few rows, cycling
through 40 distinct 1280 x 11520 weights (1.9 GB) so that, as in a U-Net forward, none is cached.
``--products`` times the three products of a training linear (forward, grad x, grad W) each
through MKL and through oneDNN's routes, for the few- and many-row shapes of an SD 1.5 U-Net
(the table behind ``ldm.accel.matmul.InnerProduct``).

    python scripts/bench_conv.py [--grad] [--bf16] [--tuned-malloc] [--linear] [--products]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ldm.accel.conv import conv2d_as_matmul
from ldm.accel.matmul import conv1x1_grad_input, inner_product, nhwc_rows, onednn_linear

SHAPES = [  # (batch, in channels, out channels, kernel, height = width)
    (2, 320, 320, 3, 32), (2, 640, 640, 3, 16), (2, 1280, 1280, 3, 8), (2, 2560, 1280, 3, 8),
    (2, 1280, 1280, 3, 4), (2, 2560, 1280, 3, 4), (2, 2560, 1280, 1, 4), (4, 1280, 1280, 3, 8),
    (4, 1280, 1280, 3, 4), (2, 1280, 1280, 3, 16), (2, 1920, 640, 3, 16), (2, 960, 640, 3, 16),
    (64, 64, 64, 3, 16), (64, 128, 128, 3, 8), (64, 192, 192, 3, 4),
]  # fmt: skip


def bench_linear(repeats: int) -> None:
    """GFLOP/s of x @ W.T and (W @ x.T).T with cold weights, for 32..512 rows (median)."""
    weights = [torch.randn(1280, 11520) for _ in range(40)]
    for rows in (32, 64, 128, 256, 512):
        x = torch.randn(rows, 11520)
        rates = {}
        orders = {"x-first": lambda w, x=x: x @ w.t(), "weight-first": lambda w, x=x: w @ x.t()}
        for name, fn in orders.items():
            t = seconds(lambda fn=fn: [fn(w) for w in weights], repeats)
            rates[name] = 2 * rows * 11520 * 1280 * len(weights) / t / 1e9
        print(f"{rows:4d} rows x 11520 -> 1280, 40 cold weights:  x-first {rates['x-first']:4.0f}  "
              f"weight-first {rates['weight-first']:4.0f} GFLOP/s")  # fmt: skip


def conv_grad_weight(g, x, w):
    """grad W = g^T x as the backward-weight pass of ``onednn_linear``'s 1x1 convolution."""
    gw = torch.ops.aten.convolution_backward(
        nhwc_rows(g), nhwc_rows(x), w.view(*w.shape, 1, 1), None, [1, 1], [0, 0], [1, 1], False,
        [0, 0], 1, [False, True, False],
    )[1]  # fmt: skip
    return gw.view(w.shape)


PRODUCTS = {  # (x (M, K), w (N, K), g (M, N)) -> the product, by route
    "fwd MKL": lambda x, w, g: F.linear(x, w),
    "fwd inner": lambda x, w, g: inner_product(x, w),
    "fwd conv": lambda x, w, g: onednn_linear(x, w),
    "gx MKL": lambda x, w, g: g @ w,
    "gx MKL w-first": lambda x, w, g: (w.t() @ g.t()).t(),
    "gx inner (W^T copy)": lambda x, w, g: inner_product(g, w.t().contiguous()),
    "gx conv": lambda x, w, g: conv1x1_grad_input(g, x, w),
    "gW MKL": lambda x, w, g: g.t() @ x,
    "gW inner": lambda x, w, g: inner_product(g.t().contiguous(), x.t().contiguous()),
    "gW conv": lambda x, w, g: conv_grad_weight(g, x, w),
}
PRODUCT_SHAPES = [  # (rows M, in K, out N): few rows (8x8 / 4x4 levels at batch 2), then many
    (32, 11520, 1280), (32, 23040, 1280), (128, 11520, 1280), (128, 1280, 1280),
    (128, 1280, 10240), (128, 5120, 1280), (32, 1280, 10240), (32, 5120, 1280),
    (2048, 320, 320), (2048, 1280, 320), (512, 640, 5120), (512, 2560, 640), (154, 768, 1280),
]  # fmt: skip


def bench_products(repeats: int) -> None:
    """GFLOP/s of each route for each product, 12 distinct weights cycled (median)."""
    for m, k, n in PRODUCT_SHAPES:
        weights = [torch.randn(n, k) for _ in range(12)]
        x, g = torch.randn(m, k), torch.randn(m, n)
        exact = {"fwd": x @ weights[0].t(), "gx": g @ weights[0], "gW": g.t() @ x}
        for name, fn in PRODUCTS.items():  # every route computes the same product
            got = fn(x, weights[0], g)
            torch.testing.assert_close(got, exact[name.split()[0]], rtol=1e-3, atol=1e-2)
        flop = 2 * m * k * n * len(weights)
        rates = {}
        for name, fn in PRODUCTS.items():
            t = seconds(lambda fn=fn, x=x, g=g, ws=weights: [fn(x, w, g) for w in ws], repeats)
            rates[name] = flop / t / 1e9
        print(
            f"{m:4d} x {k:5d} -> {n:5d}: "
            + "  ".join(f"{name} {r:.0f}" for name, r in rates.items())
        )


def seconds(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grad", action="store_true", help="time forward + backward")
    parser.add_argument("--bf16", action="store_true", help="bf16 instead of fp32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--linear", action="store_true", help="weight-first matmul, cold weights")
    parser.add_argument("--products", action="store_true", help="a training linear's products")
    parser.add_argument(
        "--tuned-malloc", action="store_true", help="ldm train's malloc (ldm/accel/malloc.py)"
    )
    args = parser.parse_args()
    if args.tuned_malloc:
        from ldm.accel.malloc import tune_cpu_allocator

        print(f"glibc malloc tuned (ldm/accel/malloc.py): {tune_cpu_allocator()}")
    if args.linear:
        bench_linear(min(args.repeats, 3))
        return
    if args.products:
        bench_products(min(args.repeats, 5))
        return
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {dtype}, "
          f"{'forward+backward' if args.grad else 'forward'}; GFLOP/s")  # fmt: skip
    for b, cin, cout, k, hw in SHAPES:
        cl = torch.channels_last
        x = torch.randn(b, cin, hw, hw, dtype=dtype).contiguous(memory_format=cl)
        w = torch.randn(cout, cin, k, k, dtype=dtype).contiguous(memory_format=cl)
        bias = torch.randn(cout, dtype=dtype)
        pad = k // 2
        for t in (x, w, bias):
            t.requires_grad_(args.grad)

        def onednn(x=x, w=w, bias=bias, pad=pad):
            out = F.conv2d(x, w, bias, padding=pad)
            if args.grad:
                out.sum().backward()

        def gemm(x=x, w=w, bias=bias, pad=pad):
            out = conv2d_as_matmul(x, w, bias, 1, pad)
            if args.grad:
                out.sum().backward()

        with torch.set_grad_enabled(args.grad):
            t1, t2 = seconds(onednn, args.repeats), seconds(gemm, args.repeats)
        flop = 2 * b * hw * hw * cin * cout * k * k * (3 if args.grad else 1)
        print(f"batch {b:3d}  {cin:4d}->{cout:4d}  {k}x{k}  {hw:2d}x{hw:<2d} "
              f"(positions {b * hw * hw:5d}):  oneDNN {flop / t1 / 1e9:6.0f}  "
              f"GEMM {flop / t2 / 1e9:6.0f}  GEMM speed-up {t1 / t2:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
