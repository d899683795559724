#!/usr/bin/env python
"""Benchmark the shapes world's CPU-side rates: the generator and the judge, in images/s.

Both are measured in CPU time of this process (``time.process_time``), so other work on a shared
machine inflates them less than wall time would. Targets on one core: generator >= 1000 images/s,
judge >= 200 images/s (the rates the tests used to assert; tests now check outputs only).

    python scripts/bench_shapes.py [--images 300]
"""

from __future__ import annotations

import argparse
import time

from ldm.data import shapes as S
from ldm.eval import judge as J


def generator_rate(n: int) -> float:
    """Images/s of ``shapes.generate(0, i)`` (layout, render and caption) over ``n`` indices."""
    start = time.process_time()
    for i in range(n):
        S.generate(0, i)
    return n / (time.process_time() - start)


def judge_rate(n: int) -> float:
    """Images/s of ``judge.judge`` on ground-truth renders of the first ``n`` evaluation prompts."""
    prompts = S.eval_prompts()[:n]
    images = [S.render_prompt(p, 0, i)[0] for i, p in enumerate(prompts)]
    start = time.process_time()
    for p, im in zip(prompts, images):
        J.judge(im, p)
    return len(prompts) / (time.process_time() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300, help="images per measurement")
    args = ap.parse_args()
    generator_rate(10), judge_rate(10)  # warm-up: imports, caches
    gen, jud = generator_rate(args.images), judge_rate(args.images)
    print(f"generator: {gen:7.0f} images/s of CPU time (target >= 1000)")
    print(f"judge:     {jud:7.0f} images/s of CPU time (target >= 200)")


if __name__ == "__main__":
    main()
