#!/usr/bin/env python
"""Teach the demo model a shape it has never seen ("diamond") with LoRA, and measure it.

1. Render a small image-caption folder (metadata.jsonl) of single diamonds, a square standing on
   its corner, in the world's colours: "a red diamond", "a cyan diamond", ...
2. Score the demo model on those prompts with a simple detector: an image counts when its largest
   object has a diamond's geometry (symmetric top to bottom, and half of its box filled, where a
   circle fills 0.79 and a square 1.0; the judge's skew and fill measures).
3. Fine-tune with LoRA (U-Net attention and ResNet convs, text encoder) through ``ldm train``.
4. Score again with ``--lora``, and score the world's own prompts before and after with the
   shapes judge (the adapter should not break what the model knew). Prints all four numbers and
   writes them to ``summary.json`` in the run folder.

Usage: python scripts/lora_concept_demo.py [--steps 300] [--images 240] [--out runs/lora-diamond]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIAMOND_FILL = (0.4, 0.7)  # rendered: 0.52-0.57; blur sigma 1: 0.56-0.68; circles >= 0.78


def make_folder(out: Path, n: int, seed: int = 0) -> Path:
    """``n`` images of one diamond each, colours cycling through the world's palette."""
    from PIL import Image

    from ldm.data.shapes import COLOURS, parse_prompt, render, sample_scene
    from ldm.io import atomic_save, atomic_write_text

    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        scene = sample_scene(rng, parse_prompt(f"a {colour} square"))  # same sizes and places
        scene = dataclasses.replace(
            scene, objects=tuple(dataclasses.replace(o, shape="diamond") for o in scene.objects)
        )
        name = f"{i:05d}.png"
        image = Image.fromarray(render(scene))
        atomic_save(out / name, lambda p, im=image: im.save(p, "PNG"))
        lines.append(json.dumps({"file_name": name, "text": f"a {colour} diamond"}))
    atomic_write_text(out / "metadata.jsonl", "\n".join(lines) + "\n")
    return out


def is_diamond(image) -> bool:
    """The largest object is top-bottom symmetric (unlike a triangle) and half-fills its box."""
    from ldm.eval.judge import SKEW_TRIANGLE, detect

    dets = detect(image)
    if not dets:
        return False
    d = dets[0]
    return abs(d.skew) <= SKEW_TRIANGLE and DIAMOND_FILL[0] <= d.fill < DIAMOND_FILL[1]


def diamond_score(images) -> float:
    return sum(is_diamond(im) for im in images) / len(images)


def world_score(images, prompts) -> float:
    from ldm.eval.judge import judge

    return sum(judge(im, p).correct for im, p in zip(images, prompts)) / len(prompts)


def generate(pipe, prompts: list[str]) -> list:
    seeds = list(range(len(prompts)))
    return [o.image for o in pipe(prompts, seeds, steps=20, guidance_scale=7.5)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/lora-diamond")
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--n", type=int, default=48, help="images scored per prompt set")
    p.add_argument("--model", default=None, help="base model (default: the bundled demo model)")
    args = p.parse_args()
    from ldm.data.shapes import COLOURS, eval_prompts
    from ldm.io import atomic_write_text
    from ldm.pipeline import DEFAULT_MODEL, load_pipeline

    out = Path(args.out)
    model = args.model or str(DEFAULT_MODEL)
    data = make_folder(out / "data", args.images)
    concept = [f"a {COLOURS[i % len(COLOURS)]} diamond" for i in range(args.n)]
    world = eval_prompts(seed=1)[:: max(1, 300 // args.n)][: args.n]  # every family, 1 seed
    base = load_pipeline(model)
    before = diamond_score(generate(base, concept)), world_score(generate(base, world), world)
    print(f"before LoRA: diamond {before[0]:.3f}, world prompts {before[1]:.3f}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "ldm", "train", "--config",
         str(ROOT / "configs/train/lora-diamond.yaml"), f"output_dir={out / 'train'}",
         f"model.pretrained={model}", f"data.source={data}", f"stages.0.steps={args.steps}",
         "--no-progress"],
        check=True,
    )  # fmt: skip
    lora = out / "train" / "lora-diamond" / "pytorch_lora_weights.safetensors"
    tuned = load_pipeline(model)
    tuned.apply_lora(lora)
    after = diamond_score(generate(tuned, concept)), world_score(generate(tuned, world), world)
    print(f"after LoRA:  diamond {after[0]:.3f}, world prompts {after[1]:.3f}", flush=True)
    summary = {"diamond_before": before[0], "diamond_after": after[0], "world_before": before[1],
               "world_after": after[1], "steps": args.steps, "images": args.images, "n": args.n,
               "lora": str(lora)}  # fmt: skip
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
