#!/usr/bin/env python
"""Benchmark ``ldm batch`` throughput (images/s) at batch sizes 1, 4, 8 against a plain loop over
diffusers' StableDiffusionPipeline on the same weights (DPM++ 2M both, same steps and size).

Both sides include writing the PNGs (ldm: infotext + record + manifest + sha256; diffusers: a plain
``image.save``). One run each after a warm-up call; CPU by default.

    python scripts/bench_batch.py                        # the demo model (or a tiny random one)
    python scripts/bench_batch.py --model DIR --images 16 --steps 20
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def bench_ldm(model: Path, prompts: list[str], steps: int, batch_size: int, outdir: Path) -> float:
    """Images/s of run_batches (the library behind ``ldm batch``) on fresh output folders."""
    from ldm.batch.jobs import Job, JobSpec, iter_jobs
    from ldm.batch.run import run_batches
    from ldm.pipeline import load_pipeline

    pipe = load_pipeline(model, device="cpu")
    prompt_file = outdir / "prompts.txt"
    prompt_file.write_text("".join(p + "\n" for p in prompts))
    spec = JobSpec({"steps": steps}, factor=pipe.factor, default_size=pipe.default_size)

    def jobs():
        return (j for j in iter_jobs(prompt_file, spec) if isinstance(j, Job))

    warm = outdir / "warmup.txt"
    warm.write_text(prompts[0] + "\n")
    warm_jobs = [j for j in iter_jobs(warm, spec) if isinstance(j, Job)]
    run_batches(pipe, lambda: warm_jobs, outdir / f"warmup{batch_size}", batch_size=1)  # warm-up
    start = time.perf_counter()
    summary = run_batches(pipe, jobs, outdir / f"bs{batch_size}", batch_size=batch_size)
    assert summary.made == len(prompts), summary
    return len(prompts) / (time.perf_counter() - start)


def bench_diffusers(model: Path, prompts: list[str], steps: int, outdir: Path) -> float:
    """Images/s of a loop calling diffusers' pipeline once per image (seed i per image)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, torch_dtype=torch.float32
    )
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    outdir.mkdir(parents=True, exist_ok=True)

    def one(i: int, prompt: str):
        g = torch.Generator("cpu").manual_seed(i)
        return pipe(prompt, num_inference_steps=steps, generator=g, height=size, width=size)

    one(0, prompts[0])  # warm-up
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        one(i, prompt).images[0].save(outdir / f"{i:05d}.png")
    return len(prompts) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="diffusers folder (default: the demo model)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-sizes", default="1,4,8")
    args = p.parse_args()

    from ldm.pipeline import DEFAULT_MODEL

    model = Path(args.model) if args.model else DEFAULT_MODEL
    # a few repeated prompts, as an asset list has (the text-embedding cache is part of ldm batch)
    colors, shapes = (
        ["red", "blue", "green", "red"] * 8,
        ["circle", "square", "triangle", "circle"] * 8,
    )
    prompts = [f"a {c} {s}" for c, s in zip(colors, shapes)]
    prompts = prompts[: args.images]
    print(f"model {model}, {args.images} images, {args.steps} steps, DPM++ 2M, CPU "
          f"({torch.get_num_threads()} threads)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        base = bench_diffusers(model, prompts, args.steps, Path(tmp) / "diffusers")
        print(f"diffusers loop      {base:8.2f} images/s")
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            ips = bench_ldm(model, prompts, args.steps, bs, Path(tmp))
            print(f"ldm batch --batch-size {bs:<2d} {ips:8.2f} images/s  ({ips / base:.2f}x)")


if __name__ == "__main__":
    main()
