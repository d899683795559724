"""SD3.5-medium transformer benchmark: ldm vs diffusers forward, CPU, fp32 and bf16.

The real SD3.5-medium config (24 blocks, width 1536, 13 dual-attention blocks, RMS q/k norm;
2.5 B parameters) with random weights, at reduced latent sizes, 333 context tokens (77 CLIP +
256 T5). Each measurement is its own process (``bench_sd3_worker.py``), ldm and diffusers
alternating ABBA, so its RSS high-water mark is its own; paired ratios per round show the
spread on a shared machine. Results: docs/benchmarks.md ("SD3.5-medium transformer").

    python scripts/bench_sd3.py [--latents 32 64] [--dtypes fp32 bf16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_sdxl import mem_available_gb, print_agreement

WORKER = Path(__file__).with_name("bench_sd3_worker.py")
NEED_GB = {"fp32": 12.5, "bf16": 7.0}  # 2.5 B parameters + the 384 x 384 position table


def run_worker(impl: str, dtype: str, args, out: Path) -> dict:
    """One measurement in a fresh process; waits (up to 5 min) until enough memory is free."""
    for _ in range(60):
        if mem_available_gb() >= NEED_GB[dtype]:
            break
        time.sleep(5)
    else:
        raise SystemExit(f"{mem_available_gb():.1f} GB available, {NEED_GB[dtype]} needed")
    argv = [sys.executable, str(WORKER), "--impl", impl, "--dtype", dtype, "--out", str(out),
            "--batch", str(args.batch), "--repeats", str(args.repeats), "--tokens",
            str(args.tokens), "--threads", str(args.threads),
            "--latents", *map(str, args.latents)]  # fmt: skip
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
            times = "; ".join(
                f"latent {k}: "
                + " ".join(f"{t:.2f}" for t in v)
                + " (CPU "
                + " ".join(f"{t:.2f}" for t in res["cpu_times"][k])
                + ")"
                for k, v in res["times"].items()
            )
            print(f"  {dtype} {impl:9} round {r}: {times} s; peak RSS {res['peak_rss_gb']:.2f} "
                  f"GB; build {res['build_s']:.0f} s; load {res['load'][0]:.1f}->"
                  f"{res['load'][1]:.1f}", flush=True)  # fmt: skip
    return results


def cpu_summary(results: dict, dtype: str, latent: int) -> str:
    """Medians of process CPU seconds per call and their ratio (meaningful with --threads 1)."""
    med = {
        k: statistics.median(t for r in v for t in r["cpu_times"][latent])
        for k, v in results.items()
    }
    return (
        f"{dtype} latent {latent} CPU time: ldm {med['ldm']:.2f} s, diffusers "
        f"{med['diffusers']:.2f} s, ratio {med['ldm'] / med['diffusers']:.3f}"
    )


def summarise(results: dict, dtype: str, latent: int) -> str:
    """Median times, their ratio, the per-round paired ratios (spread), peak RSS, checksums."""
    med = {
        k: statistics.median(t for r in v for t in r["times"][latent]) for k, v in results.items()
    }
    paired = [
        statistics.median(a["times"][latent]) / statistics.median(b["times"][latent])
        for a, b in zip(results["ldm"], results["diffusers"])
    ]
    low = {k: min(t for r in v for t in r["times"][latent]) for k, v in results.items()}
    rss = {k: max(r["peak_rss_gb"] for r in v) for k, v in results.items()}
    sums = {r["checksum"] for v in results.values() for r in v}
    return (
        f"{dtype} latent {latent}: ldm ({results['ldm'][0]['accel']}) {med['ldm']:.2f} s, "
        f"diffusers {med['diffusers']:.2f} s, ratio {med['ldm'] / med['diffusers']:.3f} "
        f"(goal <= 0.8; per-round ratios {', '.join(f'{p:.3f}' for p in paired)}; fastest "
        f"calls {low['ldm']:.2f} / {low['diffusers']:.2f} s = "
        f"{low['ldm'] / low['diffusers']:.3f}); "
        f"peak RSS ldm {rss['ldm']:.2f} GB, diffusers {rss['diffusers']:.2f} GB "
        f"(ratio {rss['ldm'] / rss['diffusers']:.3f}, goal <= 1); "
        f"weights {'identical' if len(sums) == 1 else 'DIFFER: ' + str(sums)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=2, help="processes per implementation")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per latent size")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=333)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: default); "
        "with 1, process CPU time measures the work on a shared machine",
    )
    args = parser.parse_args()
    print(f"SD3.5-medium transformer (real config, random weights), batch {args.batch}, "
          f"{args.tokens} context tokens, latents {args.latents}, CPU, "
          f"{args.threads or torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.rounds} processes x {args.repeats} calls per size", flush=True)  # fmt: skip
    outs = {}
    with tempfile.TemporaryDirectory(prefix="ldm-bench-sd3-") as tmp:
        for dtype in args.dtypes:
            results = alternate(dtype, args, Path(tmp))
            for latent in args.latents:
                print("forward " + summarise(results, dtype, latent), flush=True)
                print("forward " + cpu_summary(results, dtype, latent), flush=True)
            for impl, res in results.items():
                outs[dtype, impl] = torch.load(f"{res[0]['out']}.pt")
    print_agreement(outs, args.dtypes, "latent")


if __name__ == "__main__":
    main()
