"""``ldm distill --config FILE [key=value ...] [--resume]``: latent consistency distillation
(LCM's or TCD's consistency function).

The same runner as ``ldm train`` (stages, EMA, exact resume, checkpoints, logs, validation
grids), for a config whose stages include a ``distill`` section (docs/distill.md); the export
is the student with its sampling defaults (a LoRA bundle or a full folder).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="distillation YAML (e.g. configs/train/shapes-demo-lcm.yaml)")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument(
        "--resume", action="store_true", help="continue from the run's latest checkpoint"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ldm.accel.malloc import tune_cpu_allocator
    from ldm.config import load_config
    from ldm.errors import ConfigError
    from ldm.train.config import TrainConfig
    from ldm.train.loop import train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if cfg.stages[-1].distill is None:
        raise ConfigError(f"{args.config}: the last stage has no distill section (ldm distill "
                          "exports a student; see configs/train/shapes-demo-lcm.yaml)")  # fmt: skip
    tune_cpu_allocator()  # training only: it made sampling slower (docs/benchmarks.md)
    final = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(final)
    return 0
