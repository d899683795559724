"""``ldm shapes``: the shapes world on disk.

``ldm shapes export DIR --n N [--seed S] [--mix single_object=2,counting=1] [--size-words P]
[--layout random|tidy]`` writes an image-caption folder (``000000.png`` ... + ``metadata.jsonl``)
that any trainer reads; ``ldm shapes prompts [--out FILE]`` prints or writes the evaluation
prompts (the shipped ``configs/eval/shapes-prompts.txt`` is ``ldm shapes prompts --out`` with the
defaults).
"""

from __future__ import annotations

import argparse
import sys

PROMPTS_HEADER = (
    "# shapes-world evaluation prompts: `ldm shapes prompts --seed {seed} --per-task {n}`"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    e = sub.add_parser("export", help="write N images + metadata.jsonl to DIR")
    e.add_argument("dir", metavar="DIR", help="output folder (created if missing)")
    e.add_argument("--n", type=int, required=True, help="number of images")
    e.add_argument("--seed", type=int, default=0, help="dataset seed (0)")
    e.add_argument("--mix", help="task weights, e.g. single_object=2,counting=1 (uniform)")
    e.add_argument(
        "--size-words", type=float, default=0.0, metavar="P",
        help="probability of adding a (true) size word to a phrase (0)",
    )  # fmt: skip
    e.add_argument(
        "--layout", choices=("random", "tidy"), default="random",
        help="random: anywhere the rules allow (the world's); tidy: caption-given cells (random)",
    )  # fmt: skip
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    q = sub.add_parser("prompts", help="the evaluation prompts (50 per task)")
    q.add_argument("--out", help="write to this file instead of stdout")
    q.add_argument("--seed", type=int, default=0, help="prompt-draw seed (0)")
    q.add_argument("--per-task", type=int, default=50, help="prompts per task (50)")


def prompts_text(seed: int = 0, per_task: int = 50) -> str:
    """The prompt file's text: a header comment, then one prompt per line."""
    from ldm.data.shapes import eval_prompts

    lines = [PROMPTS_HEADER.format(seed=seed, n=per_task), *eval_prompts(seed, per_task)]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from ldm.errors import LdmError

    if args.action == "prompts":
        if args.per_task < 1:
            raise LdmError(f"--per-task must be at least 1, got {args.per_task}")
        text = prompts_text(args.seed, args.per_task)
        if args.out:
            from ldm.io import atomic_write_text

            atomic_write_text(args.out, text)
            print(args.out)
        else:
            sys.stdout.write(text)
        return 0

    from tqdm import tqdm

    from ldm.data.shapes import export

    if args.n < 1:
        raise LdmError(f"--n must be at least 1, got {args.n}")
    if not 0.0 <= args.size_words <= 1.0:
        raise LdmError(f"--size-words must be in [0, 1], got {args.size_words}")
    bar = tqdm(total=args.n, unit="img", file=sys.stderr, disable=args.no_progress)
    try:
        out = export(
            args.dir, args.n, seed=args.seed, mix=args.mix, size_words_prob=args.size_words,
            layout=args.layout, progress=lambda i, n: bar.update(1),
        )  # fmt: skip
    finally:
        bar.close()
    print(out / "metadata.jsonl")
    return 0
