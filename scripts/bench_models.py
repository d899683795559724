"""Benchmark ldm's U-Net (with ``ldm.accel`` applied) against diffusers' and OpenVINO's.

Same random weights, SD 1.5-shaped U-Net (32x32 latents, batch 2, 77-token context), CPU. The
forward in fp32 and in bf16: ldm with ``ldm-cpu``, ldm's plain U-Net through ``openvino``
(converted once, cached in /tmp/ldm-bench-openvino) and diffusers eager, interleaved per round
with a 4096^2 fp32 matmul (the faster of MKL and oneDNN) as the utilisation reference. Then a
train step (forward + backward + AdamW as `ldm train` runs it: ``ldm-cpu`` with training=True,
torch's fused AdamW, tuned malloc) against diffusers', one model at a time in ABBA rounds.

    python scripts/bench_models.py            # real SD 1.5 shape (~14 GB free RAM)
    python scripts/bench_models.py --quick    # reduced widths, a few seconds per step
    python scripts/bench_models.py --no-train --floor --inductor   # where the forward's time goes
    python scripts/bench_models.py --family sdxl --latent 16 --repeats 3 --rounds 2

``--family sdxl``: the SDXL base U-Net (real config, 2.6 B parameters), ldm (accel auto) against
diffusers, fp32 and bf16, each in its own process (peak RSS per process;
scripts/bench_sdxl.py).

``--floor`` replays the forward's own matmul, convolution and attention kernels alone, in order:
the time the forward would take if everything else cost nothing. Run with ``PYTHONPATH`` at a
tree from before ``ldm.accel`` it times that tree's (internally routed) U-Net, without OpenVINO.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import ldm
from ldm.train.adamw import AdamW

# with PYTHONPATH at a tree from before issue 18 (before/after runs; ldm's editable install would
# still resolve ldm.accel from this tree, so look at the files)
if (Path(ldm.__file__).parent / "accel").is_dir():
    from ldm import accel
    from ldm.accel.malloc import tune_cpu_allocator
    from ldm.accel.matmul import ONEDNN_MATMUL, PREFER_ONEDNN, cpu_vendor, onednn_linear
else:
    accel = None
    from ldm.models.matmul import ONEDNN_MATMUL, PREFER_ONEDNN, cpu_vendor, onednn_linear
    from ldm.runtime import tune_cpu_allocator

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
# (ldm-cpu's GEMM on non-Intel CPUs): without these entries it counts them as zero
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


OPENVINO_CACHE = Path("/tmp/ldm-bench-openvino")


def build_ldm(config, state: dict, mode: str, dtype: torch.dtype, training: bool = False):
    """ldm's U-Net on ``state``'s tensors (shared, no copy) with accelerator ``mode`` applied."""
    from ldm.models.unet import UNet2DConditionModel

    model = UNet2DConditionModel(config).train(training)
    model.load_state_dict(state, strict=True, assign=True)
    if accel is None:  # the tree before issue 18: routes inside the classes, channels_last
        return model.to(memory_format=torch.channels_last)  # its constructor's (undone by assign)
    cpu = torch.device("cpu")
    accel.apply(model, mode, device=cpu, dtype=dtype, training=training, cache_dir=OPENVINO_CACHE)
    return model


def forward_section(name: str, fns: dict, matmuls: dict, repeats: int) -> dict[str, float]:
    """Interleaved forward timings of ``fns`` (and the matmul reference); prints the ratios."""
    rounds = timings({**fns, **matmuls}, repeats)
    rounds["mm"] = [min(ts) for ts in zip(*(rounds.pop(m) for m in matmuls))]
    med = {k: statistics.median(v) for k, v in rounds.items()}
    line = "  ".join(f"{k} {v:.3f}s" for k, v in med.items() if k != "mm")
    print(f"forward {name}: {line}")
    ratios = [f"ldm-cpu/diffusers {med['ldm-cpu'] / med['diffusers']:.3f}"]
    if "openvino" in med:
        best = min(med["ldm-cpu"], med["openvino"])  # accel's openvino mode is ldm's path too
        ratios.append(f"ldm-cpu/openvino {med['ldm-cpu'] / med['openvino']:.3f}")
        ratios.append(f"ldm best/openvino {best / med['openvino']:.3f} (goal <= 1.0)")
        per = sorted(a / b for a, b in zip(rounds["ldm-cpu"], rounds["openvino"], strict=True))
        ratios.append(f"ldm-cpu/openvino per round {', '.join(f'{r:.2f}' for r in per)}")
    print(f"forward {name} ratios: " + "; ".join(ratios))
    return {**med, "rounds_ldm": rounds["ldm-cpu"], "rounds_mm": rounds["mm"]}


def openvino_forward(config, state: dict, dtype: torch.dtype, inputs: tuple, ref_out):
    """ldm's plain U-Net through ``accel.apply(..., 'openvino')``, converted (or read) once."""
    model = build_ldm(config, state, "openvino", dtype)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(*inputs)
    print(
        f"openvino {dtype}: {time.perf_counter() - start:.1f}s to convert (or read) + compile; "
        f"max |openvino - diffusers| {(out.float() - ref_out).abs().max().item():.2e}"
    )
    return model


def inference(args, cfg: dict, inputs: tuple, matmuls: dict) -> None:
    """fp32 then bf16 forwards: ldm-cpu, OpenVINO, diffusers eager, interleaved per round."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    from ldm.models.unet import UNetConfig

    torch.manual_seed(0)
    ref = DiffusersUNet(**cfg).eval()
    config = UNetConfig.from_diffusers(dict(ref.config))
    for dtype in (torch.float32, torch.bfloat16):
        ref.to(dtype)
        xs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
        inference_in(args, ref, config, dtype, xs, matmuls)
        gc.collect()


def inference_in(args, ref, config, dtype: torch.dtype, xs: tuple, matmuls: dict) -> None:
    """One dtype's forwards; ldm's models share the reference's weight tensors (no copies)."""
    state = ref.state_dict()
    ours = build_ldm(config, state, "ldm-cpu", dtype)
    with torch.no_grad():
        ref_out = ref(*xs).sample.float()
        diff = (ours(*xs).float() - ref_out).abs().max().item()
    print(f"{dtype}: max |ldm-cpu - diffusers| {diff:.2e}")
    fns = {"ldm-cpu": lambda: ours(*xs), "diffusers": lambda: ref(*xs)}
    if accel is not None and not args.no_openvino:
        ov = openvino_forward(config, state, dtype, xs, ref_out)
        fns["openvino"] = lambda: ov(*xs)
    if args.inductor and dtype == torch.float32:
        compiled = build_ldm(config, state, "inductor", dtype)
        with torch.no_grad():
            compiled(*xs)
        fns["inductor"] = lambda: compiled(*xs)
    with torch.no_grad():
        med = forward_section(str(dtype).split(".")[1], fns, matmuls, args.repeats)
    if dtype == torch.float32:
        utilisation(ours, xs, med, args)


def utilisation(model, inputs: tuple, med: dict, args) -> None:
    """The ldm-cpu forward's FLOP/s against the interleaved 4096^2 matmul's."""
    n = 4096
    flops, attention = forward_flops(model, inputs)
    achieved, peak = flops / med["ldm-cpu"], 2 * n**3 / med["mm"]
    print(
        f"forward {flops / 1e9:.1f} GFLOP ({attention / 1e9:.1f} in attention) -> "
        f"{achieved / 1e9:.1f} GFLOP/s, {100 * achieved / peak:.0f}% of the matmul's "
        f"{peak / 1e9:.1f}"
    )
    if args.floor:
        replay = kernel_replay(model, inputs)
        with torch.no_grad():
            t = median_time({"ldm-cpu": lambda: model(*inputs), "kernels alone": replay}, 3)
        print(f"kernels alone {t['kernels alone']:.3f}s against the forward {t['ldm-cpu']:.3f}s")


def training(args, cfg: dict, inputs: tuple, target: torch.Tensor) -> None:
    """Train steps, one model at a time in ABBA rounds (SD 1.5: ~14 GB per model + AdamW)."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    from ldm.models.unet import UNetConfig

    if not args.default_malloc:  # as `ldm train` runs; both models train under it
        print(f"glibc malloc tuned for the train steps: {tune_cpu_allocator()}")
    torch.manual_seed(0)
    state = DiffusersUNet(**cfg).state_dict()
    config = UNetConfig.from_diffusers(cfg)

    def build(name: str):
        if name == "ldm":
            return build_ldm(config, state, "ldm-cpu", torch.float32, training=True)
        model = DiffusersUNet(**cfg).train()
        model.load_state_dict(state, strict=True)
        return model

    train: dict[str, list[float]] = {"ldm": [], "diffusers": []}
    for name in ("ldm", "diffusers", "diffusers", "ldm"):
        model = build(name)
        step = make_train_step(model, inputs, target, fused=not args.default_adamw)
        train[name] += timings({name: step}, max(1, args.repeats // 2))[name]
        del model, step
        gc.collect()
    med = {k: statistics.median(v) for k, v in train.items()}
    low = {k: min(v) for k, v in train.items()}
    print(
        f"train step  ldm (ldm-cpu) {med['ldm']:.3f}s  diffusers {med['diffusers']:.3f}s  "
        f"ratio {med['ldm'] / med['diffusers']:.3f} (median; min ratio "
        f"{low['ldm'] / low['diffusers']:.3f}; {len(train['ldm'])} steps each, ABBA rounds; "
        f"{'default' if args.default_adamw else 'fused'} AdamW)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced widths (64..256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--no-train", action="store_true", help="skip the train-step timing")
    parser.add_argument("--no-inference", action="store_true", help="only the train steps")
    parser.add_argument("--no-openvino", action="store_true", help="skip OpenVINO")
    parser.add_argument("--floor", action="store_true", help="time the forward's kernels alone")
    parser.add_argument("--inductor", action="store_true", help="also time accel 'inductor'")
    parser.add_argument(
        "--default-malloc", action="store_true", help="train steps under glibc's defaults"
    )
    parser.add_argument(
        "--default-adamw", action="store_true", help="torch's default AdamW, not the fused one"
    )
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--latent", type=int, default=16, help="sdxl: latent side")
    parser.add_argument("--batch", type=int, default=2, help="sdxl: batch size")
    parser.add_argument("--rounds", type=int, default=2, help="sdxl: processes per model (ABBA)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="sdxl: comma-separated")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped to a file
    if args.family == "sdxl":
        import bench_sdxl  # next to this script (sys.path[0])

        dtypes = args.dtypes.split(",")
        bench_sdxl.bench_forward(args.latent, args.batch, args.repeats, args.rounds, dtypes)
        return

    cfg = QUICK_UNET if args.quick else SD15_UNET
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 32, 32, generator=gen)
    t = torch.tensor([999, 500])
    context = torch.randn(2, 77, cfg["cross_attention_dim"], generator=gen)
    target = torch.randn(2, 4, 32, 32, generator=gen)
    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    bt = b.t().contiguous()  # oneDNN's product takes the weight's (N, K) layout
    # the reference is the faster of the two fp32 GEMM libraries torch has on the CPU: MKL runs
    # at about half oneDNN's rate on AMD CPUs, so `a @ b` alone would flatter the forward there
    matmuls = {"mm MKL": lambda: a @ b, "mm oneDNN": lambda: onednn_linear(a, bt)}

    shape = "reduced" if args.quick else "SD 1.5"
    code = "ldm.accel" if accel else "before ldm.accel"
    print(f"U-Net {shape}-shaped, latents {tuple(x.shape)}, code: {code}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print(f"CPU vendor {cpu_vendor() or 'unknown'}: ldm-cpu products on "
          f"{'oneDNN' if PREFER_ONEDNN else 'MKL'}")  # fmt: skip
    if not args.no_inference:
        inference(args, cfg, (x, t, context), matmuls)
    if not args.no_train:
        training(args, cfg, (x, t, context), target)


if __name__ == "__main__":
    main()
