"""Shapes-judge reports: read prompts and images, score them per task, summarise, print a table.

Scores follow GenEval (Ghosh et al. 2023): per task the fraction of images judged correct, overall
the mean of the task scores. Bad input never stops an evaluation: a prompt outside the grammar is
skipped with its reason, an unreadable image counts as failed with its reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.shapes import TASKS, Prompt, PromptError, parse_prompt
from ldm.errors import LdmError
from ldm.eval.judge import judge
from ldm.infotext import parse_infotext, read_png_metadata
from ldm.io import atomic_write_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFESTS = ("manifest.jsonl", "metadata.jsonl")


def read_prompt_file(path: str | Path) -> tuple[list[tuple[int, str]], list[dict]]:
    """(line number, prompt) for each usable line; skipped lines with their reasons."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LdmError(f"--prompts {p}: cannot read ({e})") from None
    prompts, skipped = [], []
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            parse_prompt(text)
            prompts.append((n, text))
        except PromptError as e:
            skipped.append({"line": n, "prompt": text, "reason": str(e)})
    return prompts, skipped


def _prompt_from_png(path: Path) -> str | None:
    """The prompt stored in an image: ldm's record, else the A1111 ``parameters`` text."""
    infotext, record = read_png_metadata(path)
    if not record and infotext:
        record = parse_infotext(infotext)
    return (record or {}).get("prompt") or None


def collect_images(folder: str | Path) -> tuple[list[tuple[str, str, Path]], list[dict]]:
    """(file name, prompt, path) for each image of a folder; images without a prompt skipped.

    Prompts come from ``manifest.jsonl`` / ``metadata.jsonl`` (``file_name`` + ``text`` or
    ``prompt``) when the folder has one, else from each image's embedded metadata.
    """
    root = Path(folder)
    if not root.is_dir():
        raise LdmError(f"--images {root}: not a directory")
    for name in MANIFESTS:
        if (root / name).is_file():
            return _from_manifest(root / name)
    items, skipped = [], []
    for path in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            prompt = _prompt_from_png(path)
        except Exception as e:  # a broken file: no prompt to score it against
            prompt, why = None, f"unreadable image ({type(e).__name__}: {e})"
        else:
            why = "no prompt in the image metadata"
        if prompt is None:
            skipped.append({"file": path.name, "reason": why})
        else:
            items.append((path.name, prompt, path))
    if not items and not skipped:
        raise LdmError(f"--images {root}: no images and no manifest.jsonl/metadata.jsonl")
    return items, skipped


def _from_manifest(path: Path) -> tuple[list[tuple[str, str, Path]], list[dict]]:
    items, skipped = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row.get("file_name") or row.get("file")
            prompt = row.get("text") or row.get("prompt")
        except (json.JSONDecodeError, AttributeError):
            name = prompt = None
        if not name or not prompt:
            skipped.append({"line": n, "reason": f"{path.name}: needs file_name and text"})
            continue
        items.append((name, prompt, path.parent / name))
    return items, skipped


def _load(image: Image.Image | np.ndarray | Path) -> Image.Image | np.ndarray:
    if isinstance(image, Path):
        with Image.open(image) as im:
            return im.convert("RGB")
    return image


def evaluate(
    items: Iterable[tuple[str, str | Prompt, Image.Image | np.ndarray | Path]],
    strict: bool = False,
    skipped: list[dict] | None = None,
) -> dict:
    """Judge (name, prompt, image or path) items; the report: overall, per task, per image."""
    rows, skipped = [], list(skipped or [])
    for name, prompt, image in items:
        text = prompt if isinstance(prompt, str) else prompt.text()
        try:
            p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
        except PromptError as e:
            skipped.append({"file": name, "prompt": text, "reason": str(e)})
            continue
        row = {"file": name, "prompt": text, "task": p.task}
        try:
            img = _load(image)
        except Exception as e:  # unreadable or truncated: a failure of this image, not a crash
            rows.append(row | {"correct": False, "reason": f"unreadable image ({e})"})
            continue
        rows.append(row | judge(img, p, strict=strict).to_dict())
    return summarize(rows, skipped)


def summarize(rows: list[dict], skipped: list[dict]) -> dict:
    """Per-task fraction correct and their mean (over tasks that have images)."""
    tasks = {}
    for task in TASKS:
        ok = [r["correct"] for r in rows if r["task"] == task]
        if ok:
            tasks[task] = {"score": sum(ok) / len(ok), "correct": sum(ok), "n": len(ok)}
    overall = float(np.mean([t["score"] for t in tasks.values()])) if tasks else 0.0
    failures = [
        {k: r[k] for k in ("file", "prompt", "task", "reason")} for r in rows if not r["correct"]
    ]
    return {
        "overall": overall,
        "tasks": tasks,
        "missing_tasks": [t for t in TASKS if t not in tasks],
        "n_images": len(rows),
        "failures": failures,
        "skipped": skipped,
        "images": rows,
    }


def format_table(report: dict) -> str:
    """A plain-text table: one row per task, then overall."""
    lines = [f"{'task':<15} {'score':>6} {'correct':>9}"]
    for task, t in report["tasks"].items():
        lines.append(f"{task:<15} {t['score']:>6.3f} {t['correct']:>4}/{t['n']:<4}")
    lines.append(f"{'overall':<15} {report['overall']:>6.3f} {'':>4}{report['n_images']:>5}")
    if report["missing_tasks"]:
        lines.append(f"(no images for: {', '.join(report['missing_tasks'])})")
    if report["skipped"]:
        lines.append(f"skipped {len(report['skipped'])} (see the report's 'skipped')")
    return "\n".join(lines)


def write_report(path: str | Path, report: dict) -> None:
    atomic_write_text(path, json.dumps(report, indent=1) + "\n")
