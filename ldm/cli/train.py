"""``ldm train --config FILE [key=value ...] [--resume]``."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", required=True, help="training YAML (e.g. configs/train/shapes-demo.yaml)"
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument(
        "--resume", action="store_true", help="continue from the run's latest checkpoint"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ldm.accel.malloc import tune_cpu_allocator
    from ldm.config import load_config
    from ldm.train.config import TrainConfig
    from ldm.train.loop import train

    tune_cpu_allocator()  # training only: it made sampling slower (docs/benchmarks.md)

    cfg = load_config(TrainConfig, args.config, args.overrides)
    final = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(final)
    return 0
