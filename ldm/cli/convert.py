"""``ldm convert SRC DST --to diffusers|single-file``: between the two checkpoint formats.

SRC is a diffusers folder or an original single file (.safetensors, or a .ckpt that loads with
``torch.load(weights_only=True)``). What could not be read from a single file's keys (SD 1.x vs
2.x head counts, v-prediction) is printed, and ``--config`` / ``--prediction-type`` override it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.errors import LdmError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="diffusers folder or single file")
    p.add_argument("dst", metavar="DST", help="output folder (diffusers) or .safetensors file")
    p.add_argument("--to", required=True, choices=("diffusers", "single-file"), help="format")
    p.add_argument(
        "--prediction-type", choices=("eps", "v"),
        help="what the network predicts (single files cannot say; SD 2.x default: v)",
    )  # fmt: skip
    p.add_argument(
        "--config", metavar="PATH",
        help="diffusers folder or model .yaml whose configs describe a single-file SRC",
    )  # fmt: skip
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="weights dtype (as loaded)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def run(args: argparse.Namespace) -> int:
    import torch

    from ldm.formats.diffusers_folder import save_folder
    from ldm.formats.single_file import save_single_file
    from ldm.loading import load_model

    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise LdmError(f"{src}: no such file or folder")
    if dst.exists() and not args.overwrite:
        raise LdmError(f"{dst}: already exists (pass --overwrite to replace it)")
    if args.to == "single-file" and dst.suffix != ".safetensors":
        raise LdmError(f"{dst}: --to single-file writes a .safetensors file")
    parts = load_model(src, "cpu", torch.float32, args.config, args.prediction_type)
    for key, value in parts.inferred.items():
        print(f"inferred {key}: {value}", file=sys.stderr)
    if args.to == "diffusers":
        save_folder(parts, dst, dtype=args.dtype, overwrite=args.overwrite)
    else:
        save_single_file(parts, dst, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {dst} ({args.to}, prediction type {parts.prediction_type})")
    return 0
