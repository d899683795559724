"""SDXL benchmark driver: ldm vs diffusers, one model in memory at a time.

The SDXL base U-Net with its real config (``FAMILIES["sdxl"].single_file``, 2.6 B parameters) and
random weights, at a reduced latent size, CPU. Each measurement runs in its own process
(``bench_sdxl_worker.py``; ldm and diffusers alternate, ABBA), so its RSS high-water mark is its
own and the machine holds one model at a time; outputs go to files the driver compares. Entered
through ``bench_models.py --family sdxl`` (forward) and ``bench_txt2img.py --family sdxl``
(whole txt2img).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("bench_sdxl_worker.py")


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def run_worker(kind: str, impl: str, dtype: str, opts: dict, out: Path, need_gb: float) -> dict:
    """One measurement in a fresh process; waits (up to 5 min) until ``need_gb`` is free."""
    for _ in range(60):
        if mem_available_gb() >= need_gb:
            break
        time.sleep(5)
    else:
        raise SystemExit(f"{mem_available_gb():.1f} GB available, {need_gb} needed: not started")
    argv = [sys.executable, str(WORKER), "--worker", kind, "--impl", impl, "--dtype", dtype,
            "--out", str(out)] + [f"--{k}={v}" for k, v in opts.items()]  # fmt: skip
    subprocess.run(argv, check=True)
    return json.loads(Path(f"{out}.json").read_text())


def alternate(kind: str, dtype: str, opts: dict, rounds: int, tmp: Path, need_gb: float) -> dict:
    """``rounds`` processes per implementation in ABBA order: {impl: [results]}."""
    results: dict[str, list[dict]] = {"ldm": [], "diffusers": []}
    for r in range(rounds):
        for impl in ("ldm", "diffusers") if r % 2 == 0 else ("diffusers", "ldm"):
            out = tmp / f"{kind}-{dtype}-{impl}-{r}"
            res = run_worker(kind, impl, dtype, opts, out, need_gb)
            res["out"] = str(out)
            results[impl].append(res)
            times = " ".join(f"{t:.2f}" for t in res["times"])
            print(f"  {dtype} {impl:9} round {r}: {times} s; peak RSS {res['peak_rss_gb']:.2f} "
                  f"GB; build {res['build_s']:.0f} s; load {res['load'][0]:.1f}->"
                  f"{res['load'][1]:.1f}", flush=True)  # fmt: skip
    return results


def summary(results: dict, dtype: str, goal: str) -> str:
    """Medians over every timed call, ratio, peak RSS, load, checksum agreement."""
    med = {k: statistics.median(t for r in v for t in r["times"]) for k, v in results.items()}
    low = {k: min(t for r in v for t in r["times"]) for k, v in results.items()}
    rss = {k: max(r["peak_rss_gb"] for r in v) for k, v in results.items()}
    loads = [x for v in results.values() for r in v for x in r["load"]]
    sums = {r["checksum"] for v in results.values() for r in v}
    accel = results["ldm"][0]["accel"]
    return (
        f"{dtype}: ldm ({accel}) {med['ldm']:.2f} s, diffusers {med['diffusers']:.2f} s, ratio "
        f"{med['ldm'] / med['diffusers']:.3f} ({goal}; fastest calls: ldm {low['ldm']:.2f} s, "
        f"diffusers {low['diffusers']:.2f} s, ratio {low['ldm'] / low['diffusers']:.3f}); "
        f"peak RSS ldm {rss['ldm']:.2f} GB, "
        f"diffusers {rss['diffusers']:.2f} GB (ratio {rss['ldm'] / rss['diffusers']:.3f}); "
        f"load average {min(loads):.1f}-{max(loads):.1f}; "
        f"weights {'identical' if len(sums) == 1 else 'DIFFER: ' + str(sums)}"
    )


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def print_agreement(outs: dict, dtypes: list[str], label: str) -> None:
    """Max relative error of ldm's outputs against diffusers' per dtype, and of each side's bf16
    against diffusers' fp32; ``outs[dtype, impl]`` maps a size to its output, named by
    ``label``."""
    for dtype in dtypes:
        errs = ", ".join(f"{label} {k} {max_rel_err(outs[dtype, 'ldm'][k], v):.2e}"
                         for k, v in outs[dtype, "diffusers"].items())  # fmt: skip
        print(f"{dtype}: max rel err |ldm - diffusers| {errs}")
    if {"fp32", "bf16"} <= set(dtypes):
        for impl in ("ldm", "diffusers"):
            errs = ", ".join(f"{label} {k} {max_rel_err(outs['bf16', impl][k], v):.2e}"
                             for k, v in outs["fp32", "diffusers"].items())  # fmt: skip
            print(f"bf16 {impl} against diffusers fp32, max rel err: {errs}")


def run_dtypes(kind: str, opts: dict, rounds: int, dtypes: list[str], need_gb: dict, load):
    """Per dtype: alternate the processes, print the summary, read back each side's output."""
    outs = {}
    with tempfile.TemporaryDirectory(prefix="ldm-bench-sdxl-") as tmp:
        for dtype in dtypes:
            results = alternate(kind, dtype, opts, rounds, Path(tmp), need_gb[dtype])
            label = "forward" if kind == "unet" else kind
            print(f"{label} " + summary(results, dtype, "goal <= 0.8"), flush=True)
            for impl, res in results.items():
                outs[dtype, impl] = load(res[0]["out"])
    return outs


def bench_forward(latent: int, batch: int, repeats: int, rounds: int, dtypes: list[str]) -> None:
    """The U-Net forward, ldm vs diffusers, per dtype; outputs compared (max relative error)."""
    print(f"SDXL base U-Net (real config, random weights), latents ({batch}, 4, {latent}, "
          f"{latent}), 77 x 2048 context, CPU, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; {rounds} processes x {repeats} calls", flush=True)  # fmt: skip
    opts = dict(latent=latent, batch=batch, repeats=repeats)
    need = {"fp32": 12.5, "bf16": 7.0}
    outs = run_dtypes("unet", opts, rounds, dtypes, need, lambda out: torch.load(f"{out}.pt"))
    for dtype in dtypes:
        err = max_rel_err(outs[dtype, "ldm"], outs[dtype, "diffusers"])
        print(f"forward {dtype}: max rel err |ldm - diffusers| {err:.2e}")
    if ("bf16", "ldm") in outs and ("fp32", "diffusers") in outs:
        ref = outs["fp32", "diffusers"]
        print("bf16 against diffusers fp32, max rel err: "
              + ", ".join(f"{i} {max_rel_err(outs['bf16', i], ref):.2e}"
                          for i in ("ldm", "diffusers")))  # fmt: skip


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def bench_txt2img(latent: int, steps: int, repeats: int, rounds: int, dtypes: list[str]) -> None:
    """Whole txt2img (text encoders, euler steps with CFG, VAE decode), ldm vs diffusers."""
    import numpy as np

    size = 8 * latent
    print(f"SDXL-shaped pipeline (real U-Net, CLIP-L, OpenCLIP bigG, VAE configs; random "
          f"weights), {size}x{size}, {steps} steps euler, CFG 5, CPU, "
          f"{torch.get_num_threads()} threads; {rounds} processes x {repeats} images each "
          f"(after a one-step warm-up image)", flush=True)  # fmt: skip
    opts = dict(latent=latent, steps=steps, repeats=repeats)
    need = {"fp32": 16.0, "bf16": 9.0}
    images = run_dtypes("txt2img", opts, rounds, dtypes, need,
                        lambda out: np.load(f"{out}.npy").astype(np.int16))  # fmt: skip
    for dtype in dtypes:
        a, b = images[dtype, "ldm"], images[dtype, "diffusers"]
        print(f"txt2img {dtype}: max pixel diff ldm vs diffusers {np.abs(a - b).max()}/255, "
              f"PSNR {psnr(a, b):.1f} dB")  # fmt: skip
    if ("bf16", "ldm") in images and ("fp32", "ldm") in images:
        print("bf16 against the same pipeline's fp32 image, PSNR: "
              + ", ".join(f"{i} {psnr(images['bf16', i], images['fp32', i]):.1f} dB"
                          for i in ("ldm", "diffusers")))  # fmt: skip
