"""Benchmark ldm's U-Net against diffusers' on the same random weights (CPU fp32).

Times the forward pass and a train step (forward + backward + AdamW) of an SD 1.5-shaped
U-Net (32x32 latents, batch 2, 77-token context), prints ldm/diffusers time ratios and the
forward's achieved FLOP/s as a fraction of a large fp32 matmul measured in the same process
(the faster of MKL's and oneDNN's, interleaved with the forwards). Both models' train steps use
the AdamW `ldm train` uses (torch's fused kernel, ldm/train/adamw.py; ``--default-adamw``: torch's
default for both).

    python scripts/bench_models.py            # real SD 1.5 shape (~14 GB free RAM)
    python scripts/bench_models.py --quick    # reduced widths, a few seconds per step
    python scripts/bench_models.py --no-train --floor --compile   # where the forward's time goes

``--floor`` replays the forward's own matmul, convolution and attention kernels alone, in order,
on the same tensors: the time the forward would take if everything else (norms, activations,
adds, copies, Python) cost nothing. ``--compile`` also times ldm's forward under
``torch.compile`` (inductor fuses those elementwise ops; a few minutes of compiling first).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ldm.models.matmul import ONEDNN_MATMUL, PREFER_ONEDNN, cpu_vendor, onednn_linear
from ldm.train.adamw import AdamW

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
QUICK_UNET = dict(SD15_UNET, block_out_channels=(64, 128, 256, 256))


def timings(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call; calls interleaved so shared-CPU load drifts hit all alike."""
    for fn in fns.values():
        fn()  # warm-up (allocations, oneDNN primitive caches, optimizer state)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_time(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    return {name: statistics.median(ts) for name, ts in timings(fns, repeats).items()}


def attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """q k^T and p v of (B, heads, L, d) attention: 2 * B * heads * Lq * Lk * (d_qk + d_v)."""
    b, heads, lq, d_qk = q_shape
    return 2 * b * heads * lq * k_shape[2] * (d_qk + v_shape[3])


def inner_product_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """oneDNN's inner product x (..., K) @ w (N, K)^T, counted like aten.addmm: 2 * M * K * N."""
    return 2 * math.prod(x_shape) * w_shape[0]


# torch's FlopCounterMode has formulas for the CUDA attention kernels but none for the CPU flash
# kernel that F.scaled_dot_product_attention runs here, and none for oneDNN's inner product
# (ldm.models.matmul's GEMM on non-Intel CPUs): without these entries it counts them as zero
# FLOPs while their time is in the forward.
ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}
EXTRA_FLOPS = dict(ATTENTION_FLOPS)
if ONEDNN_MATMUL is not None:
    EXTRA_FLOPS[ONEDNN_MATMUL.overloadpacket] = inner_product_flops


def forward_flops(model: torch.nn.Module, args: tuple) -> tuple[int, int]:
    """FLOPs of ``model(*args)``: (all of them, those in attention's q k^T and p v products)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=EXTRA_FLOPS) as c:
        model(*args)
    counts = c.get_flop_counts()["Global"]
    attention = sum(n for op, n in counts.items() if op in ATTENTION_FLOPS)
    return c.get_total_flops(), attention


COMPUTE_KERNELS = (
    "aten.addmm.default",
    "aten.mm.default",
    "aten.bmm.default",
    "aten.convolution.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "mkldnn._linear_pointwise.default",
)


class KernelRecorder(TorchDispatchMode):
    """Records the compute-kernel calls (op, arguments) of what runs under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if str(func) in COMPUTE_KERNELS:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def kernel_replay(model: torch.nn.Module, args: tuple) -> Callable[[], None]:
    """A function that runs only ``model(*args)``'s compute kernels, in order, on its tensors."""
    with torch.no_grad(), KernelRecorder() as recorder:
        model(*args)
    calls = recorder.calls  # holds the forward's activations (a few hundred MB for SD 1.5)

    def replay() -> None:
        for func, call_args, kwargs in calls:
            func(*call_args, **kwargs)

    return replay


def make_train_step(
    model: torch.nn.Module, args: tuple, target: torch.Tensor, fused: bool = True
) -> Callable:
    # the optimizer `ldm train` uses (torch's fused AdamW, layout-aware) for both models, or
    # torch's default (single-tensor on the CPU) for both
    opt = (AdamW if fused else torch.optim.AdamW)(model.parameters(), lr=1e-6)

    def step() -> None:
        out = model(*args)
        out = out.sample if hasattr(out, "sample") else out
        torch.nn.functional.mse_loss(out, target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced widths (64..256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--no-train", action="store_true", help="skip the train-step timing")
    parser.add_argument("--floor", action="store_true", help="time the forward's kernels alone")
    parser.add_argument("--compile", action="store_true", help="time a torch.compile'd forward")
    parser.add_argument(
        "--default-malloc", action="store_true", help="train steps under glibc's defaults"
    )
    parser.add_argument(
        "--default-adamw", action="store_true", help="torch's default AdamW, not the fused one"
    )
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped to a file

    from diffusers import UNet2DConditionModel as DiffusersUNet

    from ldm.models.unet import UNet2DConditionModel, UNetConfig

    cfg = QUICK_UNET if args.quick else SD15_UNET
    torch.manual_seed(0)
    ref = DiffusersUNet(**cfg).train()
    ours = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config))).train()
    ours.load_state_dict(ref.state_dict(), strict=True)  # each model in its default layout
    n_params = sum(p.numel() for p in ours.parameters())

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 32, 32, generator=gen)
    t = torch.tensor([999, 500])
    context = torch.randn(2, 77, cfg["cross_attention_dim"], generator=gen)
    target = torch.randn(2, 4, 32, 32, generator=gen)
    inputs = (x, t, context)
    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    bt = b.t().contiguous()  # oneDNN's product takes the weight's (N, K) layout
    # the reference is the faster of the two fp32 GEMM libraries torch has on the CPU: MKL runs
    # at about half oneDNN's rate on AMD CPUs, so `a @ b` alone would flatter the forward there
    matmuls = {"mm MKL": lambda: a @ b, "mm oneDNN": lambda: onednn_linear(a, bt)}

    shape = "reduced" if args.quick else "SD 1.5"
    print(f"U-Net {shape}-shaped, {n_params / 1e6:.0f}M params, latents {tuple(x.shape)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print(
        f"CPU vendor {cpu_vendor() or 'unknown'}: ldm's products on "
        f"{'oneDNN' if PREFER_ONEDNN else 'MKL'} (ldm/models/matmul.py)"
    )
    with torch.no_grad():
        diff = (ref(*inputs).sample - ours(*inputs)).abs().max().item()
        print(f"max |ldm - diffusers| on the forward: {diff:.2e}")
        # the matmul is timed interleaved with the forwards, under the same machine load
        fns = {"ldm": lambda: ours(*inputs), "diffusers": lambda: ref(*inputs), **matmuls}
        rounds = timings(fns, args.repeats)
        rounds["mm"] = [min(ts) for ts in zip(*(rounds[name] for name in matmuls))]
        fwd = {name: statistics.median(ts) for name, ts in rounds.items()}
    ratio = fwd["ldm"] / fwd["diffusers"]
    print(
        f"forward     ldm {fwd['ldm']:.3f}s  diffusers {fwd['diffusers']:.3f}s  ratio {ratio:.3f}"
    )

    # for transparency: diffusers given the same channels_last weight layout as ldm uses
    ref.to(memory_format=torch.channels_last)
    with torch.no_grad():
        fns = {"ldm": lambda: ours(*inputs), "diffusers": lambda: ref(*inputs)}
        fwd_cl = median_time(fns, args.repeats)
    ref.to(memory_format=torch.contiguous_format)
    ratio = fwd_cl["ldm"] / fwd_cl["diffusers"]
    print(
        f"forward vs diffusers in channels_last: ldm {fwd_cl['ldm']:.3f}s  "
        f"diffusers {fwd_cl['diffusers']:.3f}s  ratio {ratio:.3f}"
    )

    flops, attention = forward_flops(ours, inputs)
    achieved, peak = flops / fwd["ldm"], 2 * n**3 / fwd["mm"]
    print(
        f"forward {flops / 1e9:.1f} GFLOP ({attention / 1e9:.1f} of them in attention's q k^T "
        f"and p v) -> {achieved / 1e9:.1f} GFLOP/s"
    )
    rates = ", ".join(f"{name[3:]} {2 * n**3 / fwd[name] / 1e9:.1f}" for name in matmuls)
    print(f"fp32 {n}^2 matmul GFLOP/s: {rates}; reference (faster per round) {peak / 1e9:.1f}")
    print(f"ldm forward at {100 * achieved / peak:.0f}% of the matmul rate")
    # the machine's speed drifts (other tenants share its memory bandwidth and L3): the same
    # ratio within each round of the interleaved timings shows how much
    per_round = sorted(t_mm / t for t, t_mm in zip(rounds["ldm"], rounds["mm"], strict=True))
    per_round = [100 * flops * r / (2 * n**3) for r in per_round]
    print(f"per round: {', '.join(f'{u:.0f}%' for u in per_round)}")
    extra = {}
    if args.floor:
        extra["kernels alone"] = kernel_replay(ours, inputs)
    if args.compile:
        compiled = torch.compile(ours)
        start = time.perf_counter()
        with torch.no_grad():
            diff = (compiled(*inputs) - ours(*inputs)).abs().max().item()
        print(f"torch.compile: {time.perf_counter() - start:.0f}s to compile; max diff {diff:.1e}")
        extra["torch.compile"] = lambda: compiled(*inputs)
    if extra:  # timed again with the eager forward and the matmul, interleaved
        with torch.no_grad():
            fns = {"ldm": lambda: ours(*inputs), **extra, **matmuls}
            times = timings(fns, args.repeats)
        times["mm"] = [min(ts) for ts in zip(*(times.pop(name) for name in matmuls))]
        med = {name: statistics.median(ts) for name, ts in times.items()}
        for name, seconds in med.items():
            if name != "mm":
                util = 100 * flops / seconds / (2 * n**3 / med["mm"])
                print(f"{name:>14}: {seconds:.3f}s, {util:.0f}% of the matmul rate")

    if not args.no_train:
        if not args.default_malloc:  # as `ldm train` runs; both models train under it
            from ldm.runtime import tune_cpu_allocator

            tuned = tune_cpu_allocator()
            print(f"glibc malloc tuned for the train steps (ldm/runtime.py): {tuned}")
        # one model + AdamW state at a time (SD 1.5: 3.4 GB weights + 10 GB grads and moments),
        # each rebuilt from the same weights in ABBA rounds, so the machine's drift over minutes
        # hits both alike
        state = ours.state_dict()
        config = UNetConfig.from_diffusers(dict(ref.config))
        del ref, ours
        gc.collect()
        build = {
            "ldm": lambda: UNet2DConditionModel(config),
            "diffusers": lambda: DiffusersUNet(**cfg),
        }
        train: dict[str, list[float]] = {"ldm": [], "diffusers": []}
        for name in ("ldm", "diffusers", "diffusers", "ldm"):
            model = build[name]().train()
            model.load_state_dict(state, strict=True)
            step = make_train_step(model, inputs, target, fused=not args.default_adamw)
            train[name] += timings({name: step}, max(1, args.repeats // 2))[name]
            del model, step
            gc.collect()
        med = {k: statistics.median(v) for k, v in train.items()}
        low = {k: min(v) for k, v in train.items()}
        print(
            f"train step  ldm {med['ldm']:.3f}s  diffusers {med['diffusers']:.3f}s  "
            f"ratio {med['ldm'] / med['diffusers']:.3f} (median; min ratio "
            f"{low['ldm'] / low['diffusers']:.3f}; {len(train['ldm'])} steps each, ABBA rounds; "
            f"{'default' if args.default_adamw else 'fused'} AdamW)"
        )


if __name__ == "__main__":
    main()
