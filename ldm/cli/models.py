"""``ldm models``: the bundled models, usable by name as ``--model NAME`` (ldm.models.bundled).

One line each: name, kind (a model, or a LoRA on a base model), the sampling defaults it
generates with when no flag says otherwise, size on disk, description; ``--json`` for machines.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="a JSON list instead of a table")


def run(args: argparse.Namespace) -> int:
    from ldm.models.bundled import BUNDLED_DIR, bundled_names, describe

    models = [describe(BUNDLED_DIR / name) for name in bundled_names()]
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print(f"no bundled models in {BUNDLED_DIR}")
        return 0
    rows = [("NAME", "KIND", "DEFAULTS", "SIZE", "DESCRIPTION")]
    rows += [(m["name"], _kind(m), _defaults(m["defaults"]), _size(m["size_bytes"]),
              m["description"] or "-") for m in models]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
    print("\nuse one as --model NAME (an existing file or folder of that name wins: ./NAME)")
    return 0


def _kind(m: dict) -> str:
    return f"LoRA on {m['base']}" if m["kind"] == "lora" else "model"


def _defaults(d: dict) -> str:
    if not {"sampler", "steps", "guidance_scale"} <= set(d):
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"
    schedule = d.get("schedule") or "default"
    sampler = d["sampler"] + ("" if schedule == "default" else f" {schedule}")
    eta = "" if d.get("eta") is None else f", eta {d['eta']:g}"
    return f"{sampler}{eta}, {d['steps']} steps, CFG {d['guidance_scale']:g}"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
