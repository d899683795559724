"""FLUX.1 transformer benchmark: ldm vs diffusers forward, CPU, bf16 and fp32.

FLUX.1-dev's real width (24 heads x 128 = 3072, T5 4096, pooled CLIP 768, guidance embedding,
RoPE axes 16/56/56) at a reduced depth (default 1 double- + 2 single-stream blocks of the real
19 + 38) with random weights drawn per key as in the SDXL benchmark, at reduced image sizes
(default 256 px: 256 packed image tokens) and 256 T5 tokens. Each measurement is its own process
(this script with ``--worker``), ldm and diffusers alternating ABBA, so its RSS high-water mark
is its own. Run with OMP_NUM_THREADS=1 (``--threads 1``): process CPU time is then the work
itself on a shared machine. Results: docs/benchmarks.md ("FLUX.1 transformer").

    OMP_NUM_THREADS=1 python scripts/bench_flux.py [--sizes 256 512] [--dtypes bf16 fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from bench_sd3_worker import timed
from bench_sdxl import mem_available_gb, print_agreement
from bench_sdxl_worker import DTYPES, assign_, checksum, peak_rss_gb, trim

# black-forest-labs/FLUX.1-dev transformer/config.json, depth reduced by --double/--single
FLUX_DEV = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56],
)  # fmt: skip
NEED_GB = {"fp32": 4.0, "bf16": 2.5}  # 0.69 B parameters at the default depth, plus activations


# ---------------------------------------------------------------- worker: one process, one model


def build(
    impl: str, dtype: torch.dtype, config: dict, mode: str = "auto"
) -> tuple[torch.nn.Module, float, str]:
    """The transformer with the drawn weights: ldm's (``ldm.accel`` ``mode``) or diffusers'."""
    with torch.device("meta"):
        if impl == "ldm":
            from ldm.models.flux import FluxConfig, FluxTransformer2DModel

            model = FluxTransformer2DModel(FluxConfig.from_diffusers(config))
        else:
            from diffusers import FluxTransformer2DModel as Theirs

            model = Theirs(**config)
    model = assign_(model, dtype).eval()
    total = checksum(model)
    if impl == "diffusers":
        return model, total, "eager"
    from ldm import accel

    decision = accel.apply(model, mode, device=torch.device("cpu"), dtype=dtype)
    return model, total, decision.mode


def image_ids(impl: str, side: int, dtype: torch.dtype) -> torch.Tensor:
    """Each side's own image ids (equal: tests/test_flux_transformer.py); an ldm process never
    imports diffusers' pipelines (a few hundred MB of RSS)."""
    if impl == "ldm":
        from ldm.models.flux_packing import image_ids

        return image_ids(side, side, dtype=dtype)
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, side // 2, side // 2, "cpu", dtype)


def inputs(impl: str, size: int, tokens: int, dtype: torch.dtype) -> dict:
    """Packed latents of a size x size image, T5 tokens, pooled CLIP, ids, sigma, guidance 3.5,
    as diffusers' FluxPipeline passes them."""
    side = 2 * (size // 16)  # latent side, diffusers' rounding
    gen = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, (side // 2) ** 2, 64, generator=gen).to(dtype),
        encoder_hidden_states=torch.randn(1, tokens, 4096, generator=gen).to(dtype),
        pooled_projections=torch.randn(1, 768, generator=gen).to(dtype),
        timestep=torch.tensor([0.75]).to(dtype),
        img_ids=image_ids(impl, side, dtype),
        txt_ids=torch.zeros(tokens, 3, dtype=dtype),
        guidance=torch.tensor([3.5]),
    )


def status_gb(field: str) -> float:
    """A memory figure of /proc/self/status (VmHWM: peak RSS since the last reset), GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak_rss() -> None:
    """Linux: VmHWM := the current RSS (clear_refs 5); getrusage's maximum is not reset."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(args) -> None:
    """Build one model, time its forward per size, write {times, peak RSS, checksum} + outputs."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    config = dict(FLUX_DEV, num_layers=args.double, num_single_layers=args.single)
    start = time.perf_counter()
    model, total, mode = build(args.impl, dtype, config, args.accel)
    trim()
    build_s = time.perf_counter() - start
    times, cpu_times, outs = {}, {}, {}
    all_inputs = {size: inputs(args.impl, size, args.tokens, dtype) for size in args.sizes}
    reset_peak_rss()  # from here the high-water mark is weights + the forward's working memory
    rss_before = status_gb("VmRSS")
    for i, size in enumerate(args.sizes):
        kw = all_inputs[size]
        if args.impl == "ldm":
            call = partial(model, **kw)
        else:
            call = partial(lambda **k: model(**k, return_dict=False)[0], **kw)
        with torch.inference_mode():
            times[size], cpu_times[size], out = timed(call, 1 if i == 0 else 0, args.repeats)
        outs[size] = out.float()
    forward_peak = status_gb("VmHWM")
    torch.save(outs, f"{args.out}.pt")
    result = dict(times=times, cpu_times=cpu_times, peak_rss_gb=peak_rss_gb(), checksum=total,
                  forward_peak_gb=forward_peak, rss_before_gb=rss_before, build_s=build_s,
                  accel=mode, threads=torch.get_num_threads())  # fmt: skip
    tmp = Path(f"{args.out}.json.tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(f"{args.out}.json")


# ---------------------------------------------------------------- driver: alternate, summarise


def run_worker(impl: str, dtype: str, args, out: Path) -> dict:
    """One measurement in a fresh process; waits (up to 5 min) until enough memory is free."""
    for _ in range(60):
        if mem_available_gb() >= NEED_GB[dtype]:
            break
        time.sleep(5)
    else:
        raise SystemExit(f"{mem_available_gb():.1f} GB available, {NEED_GB[dtype]} needed")
    argv = [sys.executable, __file__, "--worker", "--impl", impl, "--dtype", dtype,
            "--out", str(out), "--repeats", str(args.repeats), "--tokens", str(args.tokens),
            "--threads", str(args.threads), "--double", str(args.double),
            "--single", str(args.single), "--accel", args.accel,
            "--sizes", *map(str, args.sizes)]  # fmt: skip
    subprocess.run(argv, check=True)
    res = json.loads(Path(f"{out}.json").read_text())
    for key in ("times", "cpu_times"):
        res[key] = {int(k): v for k, v in res[key].items()}
    return res


def alternate(dtype: str, args, tmp: Path) -> dict[str, list[dict]]:
    """``rounds`` processes per implementation in ABBA order: {impl: [results]}."""
    results: dict[str, list[dict]] = {"ldm": [], "diffusers": []}
    for r in range(args.rounds):
        for impl in ("ldm", "diffusers") if r % 2 == 0 else ("diffusers", "ldm"):
            out = tmp / f"{dtype}-{impl}-{r}"
            res = run_worker(impl, dtype, args, out)
            res["out"] = str(out)
            results[impl].append(res)
            cpu = "; ".join(f"{k}px " + " ".join(f"{t:.3f}" for t in v)
                            for k, v in res["cpu_times"].items())  # fmt: skip
            rss, fwd, load = res["peak_rss_gb"], res["forward_peak_gb"], os.getloadavg()[0]
            print(f"  {dtype} {impl:9} round {r}: CPU s {cpu}; peak RSS {rss:.2f} GB (build), "
                  f"{fwd:.2f} GB (forwards); load {load:.1f}", flush=True)  # fmt: skip
    return results


def summarise(results: dict, dtype: str, size: int) -> str:
    """Median CPU seconds per call, their ratio, per-round paired ratios, peak RSS, checksums."""
    med = {
        k: statistics.median(t for r in v for t in r["cpu_times"][size]) for k, v in results.items()
    }
    wall = {
        k: statistics.median(t for r in v for t in r["times"][size]) for k, v in results.items()
    }
    paired = [
        statistics.median(a["cpu_times"][size]) / statistics.median(b["cpu_times"][size])
        for a, b in zip(results["ldm"], results["diffusers"])
    ]
    rss = {k: max(r["peak_rss_gb"] for r in v) for k, v in results.items()}
    fwd = {k: max(r["forward_peak_gb"] for r in v) for k, v in results.items()}
    work = {  # what the forwards added to the resident weights (and the weight-drawing pool)
        k: max(r["forward_peak_gb"] - r["rss_before_gb"] for r in v) for k, v in results.items()
    }
    sums = {r["checksum"] for v in results.values() for r in v}
    return (
        f"{dtype} {size}px: ldm ({results['ldm'][0]['accel']}) {med['ldm']:.3f} s, diffusers "
        f"{med['diffusers']:.3f} s CPU, ratio {med['ldm'] / med['diffusers']:.3f} (goal <= 0.8; "
        f"per-round {', '.join(f'{p:.3f}' for p in paired)}; wall ratio "
        f"{wall['ldm'] / wall['diffusers']:.3f}); peak RSS in the forwards ldm {fwd['ldm']:.3f} GB,"
        f" diffusers {fwd['diffusers']:.3f} GB (ratio {fwd['ldm'] / fwd['diffusers']:.3f}, goal "
        f"<= 1; working memory above the weights {work['ldm'] * 1024:.0f} / "
        f"{work['diffusers'] * 1024:.0f} MB; whole process {rss['ldm']:.2f} / "
        f"{rss['diffusers']:.2f} GB); "
        f"weights {'identical' if len(sums) == 1 else 'DIFFER: ' + str(sums)}"
    )


def driver(args) -> None:
    tokens = (2 * (args.sizes[-1] // 16)) ** 2 // 4
    print(f"FLUX.1-dev transformer, real width, {args.double} double + {args.single} single "
          f"blocks (random weights), batch 1, {args.tokens} T5 tokens, sizes {args.sizes} px "
          f"(last: {tokens} image tokens), CPU {args.threads or torch.get_num_threads()} "
          f"threads, torch {torch.__version__}; {args.rounds} processes x {args.repeats} calls "
          "per size", flush=True)  # fmt: skip
    outs = {}
    with tempfile.TemporaryDirectory(prefix="ldm-bench-flux-") as tmp:
        for dtype in args.dtypes:
            results = alternate(dtype, args, Path(tmp))
            for size in args.sizes:
                print("forward " + summarise(results, dtype, size), flush=True)
            for impl, res in results.items():
                outs[dtype, impl] = torch.load(f"{res[0]['out']}.pt")
    print_agreement(outs, args.dtypes, "px")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256], help="image sides, px")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--tokens", type=int, default=256, help="T5 tokens (schnell's max)")
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (real: 19)")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks (real: 38)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per implementation")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--accel", default="auto", help="ldm.accel mode for ldm's model")
    # worker mode (run by the driver)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=("ldm", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
