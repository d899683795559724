#!/usr/bin/env python
"""U-Net iterations per second on a GPU: ldm against diffusers, eager and ``torch.compile``.

One sampler iteration with classifier-free guidance is one U-Net call on a batch of 2 (cond and
uncond), so it/s here is U-Net calls per second at batch 2: SD 1.5-shaped (the real config of
scripts/bench_txt2img.py, random weights), 512x512 (64x64 latents), 77 tokens, fp16 on CUDA.
Both networks hold the same weights (ldm's loaded from diffusers' state dict) and run the stock
modules, as ldm runs on CUDA. Rounds alternate between the two; the median round is reported,
with the largest output difference as a check that both compute the same function.

    python scripts/bench_gpu.py                       # cuda, fp16, eager and compiled
    python scripts/bench_gpu.py --device cpu --tiny   # a dry run with the tests' tiny U-Net
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build(tiny: bool, device: str, dtype: torch.dtype):
    """(diffusers U-Net, ldm U-Net) with identical random weights on ``device`` in ``dtype``."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    from ldm.models.unet import UNet2DConditionModel, UNetConfig

    if tiny:
        from tiny import UNET_SD1 as config
    else:
        from bench_txt2img import UNET as config
    torch.manual_seed(0)
    ref = DiffusersUNet(**config).eval()
    ours = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return (m.to(device, dtype).requires_grad_(False) for m in (ref, ours))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(call, device: str, iters: int) -> float:
    """Calls per second over ``iters`` back-to-back calls (device synchronised at both ends)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        call()
    sync(device)
    return iters / (time.perf_counter() - start)


def compare(calls: dict, device: str, iters: int, rounds: int, warmup: int) -> dict[str, float]:
    """Median it/s of each call over ``rounds`` alternating rounds, after ``warmup`` calls each."""
    for name, call in calls.items():
        start = time.perf_counter()
        for _ in range(warmup):
            call()
        sync(device)
        print(f"  {name}: warm-up {time.perf_counter() - start:.1f} s", flush=True)
    got = {name: [] for name in calls}
    for r in range(rounds):
        for name in list(calls)[:: 1 if r % 2 == 0 else -1]:
            got[name].append(rate(calls[name], device, iters))
    return {name: statistics.median(v) for name, v in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=DTYPES, help="default fp16 on cuda, fp32 elsewhere")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny U-Net (dry run)")
    ap.add_argument("--size", type=int, help="pixels (512; --tiny: 64)")
    ap.add_argument("--iters", type=int, default=20, help="calls per timed round (20)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first (3)")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_gpu: CUDA is not available (use --device cpu --tiny for a dry run)")
    dtype = DTYPES[args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")]
    size = args.size or (64 if args.tiny else 512)
    torch.backends.cuda.matmul.allow_tf32 = True  # diffusers' and ldm's fp32 default on CUDA
    ref, ours = build(args.tiny, args.device, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size // 8, size // 8, generator=gen).to(args.device, dtype)
    context = torch.randn(2, 77, ref.config.cross_attention_dim, generator=gen)
    context = context.to(args.device, dtype)
    t = torch.tensor([981.0, 981.0], device=args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(
        f"U-Net {'tiny' if args.tiny else 'SD 1.5-shaped'}, batch 2, {size}x{size} "
        f"({size // 8}x{size // 8} latents), {str(dtype).removeprefix('torch.')}, {name}, "
        f"torch {torch.__version__}",
        flush=True,
    )
    with torch.no_grad():  # not inference_mode: torch.compile traces under no_grad
        diff = (ref(x, t, context).sample - ours(x, t, context)).abs().max().item()
        print(f"max |ldm - diffusers| {diff:.3g}", flush=True)
        modes = {"eager": lambda m: m} | ({} if args.no_compile else {"compile": torch.compile})
        for mode, wrap in modes.items():
            r, o = wrap(ref), wrap(ours)
            calls = {
                "diffusers": lambda r=r: r(x, t, context).sample,
                "ldm": lambda o=o: o(x, t, context),
            }
            res = compare(calls, args.device, args.iters, args.rounds, args.warmup)
            print(
                f"{mode:8s} diffusers {res['diffusers']:7.2f} it/s   ldm {res['ldm']:7.2f} it/s"
                f"   ldm/diffusers time {res['diffusers'] / res['ldm']:.3f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
