"""ldm-cpu's inference routes against torch's defaults, one op at a time (CPU, bf16).

Packed weights (``ldm.accel.packed``) against ``F.linear``, the tanh GELU as a post-op, and
``ldm.accel.attention.sdpa`` against the CPU flash kernel, at FLUX's and SD3's shapes. Times are
process CPU seconds (median of 5 calls): run with OMP_NUM_THREADS=1 on a shared machine.
Results: docs/benchmarks.md ("Packed weights, fused GELU and CPU attention").

    OMP_NUM_THREADS=1 python scripts/bench_cpu_routes.py
"""

from __future__ import annotations

import time
from functools import partial

import torch
import torch.nn.functional as F

from ldm.accel.attention import sdpa
from ldm.accel.matmul import ONEDNN_MATMUL


def cpu_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def products(k: int = 3072, n: int = 12288) -> None:
    w = (torch.randn(n, k) / k**0.5).bfloat16()
    b = torch.randn(n).bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(w)
    for m in (1, 64, 256, 512, 1024):
        x = torch.randn(m, k).bfloat16()
        plain = cpu_ms(partial(F.linear, x, w, b))
        fast = cpu_ms(partial(ONEDNN_MATMUL, x, packed, b, "none", [], ""))
        same = torch.equal(ONEDNN_MATMUL(x, packed, b, "none", [], ""), F.linear(x, w, b))
        print(f"bf16 {m} x {k} -> {n}: F.linear {plain:.2f} ms, packed {fast:.2f} ms "
              f"({fast / plain:.2f}), equal {same}")  # fmt: skip
    x = torch.randn(512, k).bfloat16()
    unfused = cpu_ms(lambda: F.gelu(F.linear(x, w, b), approximate="tanh"))
    fused = cpu_ms(lambda: ONEDNN_MATMUL(x, packed, b, "gelu", [], "tanh"))
    print(f"bf16 512 x {k} -> {n} + tanh GELU: unfused {unfused:.1f} ms, post-op {fused:.1f} ms")


def attention() -> None:
    shapes = [(1, 512, 512, 128), (1, 256, 512, 128), (2, 589, 589, 64), (1, 1024, 1024, 64),
              (1, 1357, 1357, 64)]  # fmt: skip
    for b, n, s, d in shapes:
        q = torch.randn(b, n, 24, d).bfloat16().transpose(1, 2)  # the models' strided views
        k, v = (torch.randn(b, 24, s, d).bfloat16() for _ in range(2))
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        flash = cpu_ms(partial(F.scaled_dot_product_attention, q, k, v))
        ours = cpu_ms(partial(sdpa, q, k, v))
        errs = [(f(q, k, v).double() - exact).abs().max().item()
                for f in (F.scaled_dot_product_attention, sdpa)]  # fmt: skip
        print(
            f"attention b {b}, {n} x {s} tokens, head dim {d}: flash {flash:.1f} ms, ldm "
            f"{ours:.1f} ms ({ours / flash:.2f}); max error {errs[0]:.1e} / {errs[1]:.1e}"
        )


if __name__ == "__main__":
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    with torch.inference_mode():
        products()
        attention()
