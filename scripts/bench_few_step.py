#!/usr/bin/env python
"""Few-step student vs its teacher (issue 23): ``ldm eval shapes`` scores at 1/2/4/8 student
steps against the teacher at its defaults, and whole ``ldm batch`` runs of the eval prompts,
teacher and student alternated as separate processes, in images/s.

    python scripts/bench_few_step.py                                # shapes-demo-eps vs -lcm
    python scripts/bench_few_step.py --teacher DIR --student DIR --rounds 3 --steps 2,4

Prints a markdown table for docs/benchmarks.md. Scores come from the JSON reports; times are
wall-clock of whole processes (model loading included, as a user's run would have it).
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

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "configs" / "eval" / "shapes-prompts.txt"
LDM = [str(Path(sys.executable).parent / "ldm")]  # the venv's entry point


def timed(cmd: list[str]) -> float:
    """Wall seconds of one process; its output is kept only if it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return seconds


def evaluate(model: str, work: Path, tag: str, extra: list[str]) -> tuple[dict, float]:
    """(report, images/s) of ``ldm eval shapes`` on the shipped prompts."""
    outdir = work / f"eval-{tag}"
    seconds = timed([*LDM, "eval", "shapes", "--model", model, "--outdir", str(outdir),
                     "--no-progress", *extra])  # fmt: skip
    report = json.loads((outdir / "shapes-report.json").read_text())
    return report, report["n_images"] / seconds


def batch_rates(models: dict[str, list[str]], work: Path, rounds: int) -> dict[str, list[float]]:
    """images/s of ``ldm batch`` over the eval prompts, each model once per round, alternated."""
    prompts = [line for line in PROMPTS.read_text().splitlines() if line.strip()]
    rates: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        for name, args in models.items():
            outdir = work / f"batch-{name}-{r}"
            seconds = timed([*LDM, "batch", "--prompts", str(PROMPTS), "--outdir", str(outdir),
                             "--no-progress", *args])  # fmt: skip
            rates[name].append(len(prompts) / seconds)
            print(f"round {r}: {name} {rates[name][-1]:.2f} images/s", file=sys.stderr)
    return rates


def row(label: str, report: dict, rate: float) -> str:
    tasks = " | ".join(f"{t['score']:.2f}" for t in report["tasks"].values())
    return f"| {label} | **{report['overall']:.3f}** | {tasks} | {rate:.1f} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="shapes-demo-eps")
    p.add_argument("--student", default="shapes-demo-lcm")
    p.add_argument("--steps", default="1,2,4,8", help="student step counts to score")
    p.add_argument("--rounds", type=int, default=2, help="alternated ldm batch rounds")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--skip-batch", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_eval:
            report, rate = evaluate(args.teacher, work, "teacher", [])
            header = " | ".join(report["tasks"])
            lines = [f"| model, steps | overall | {header} | eval images/s |",
                     "|---" * (len(report["tasks"]) + 3) + "|",
                     row(f"teacher ({args.teacher}), its defaults", report, rate)]  # fmt: skip
            for n in [int(s) for s in args.steps.split(",")]:
                report, rate = evaluate(args.student, work, f"student{n}", ["--steps", str(n)])
                lines.append(row(f"student ({args.student}), {n} steps", report, rate))
            print("\n".join(lines))
        if not args.skip_batch:
            models = {"teacher": ["--model", args.teacher], "student": ["--model", args.student]}
            rates = batch_rates(models, work, args.rounds)
            ratios = [s / t for s, t in zip(rates["student"], rates["teacher"], strict=True)]
            for name, values in rates.items():
                print(f"ldm batch {name}: " + ", ".join(f"{v:.2f}" for v in values) + " images/s")
            print(f"student / teacher: median {statistics.median(ratios):.2f}x "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
