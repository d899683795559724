"""``ldm eval shapes``: GenEval-style prompt-adherence score in the shapes world.

``ldm eval shapes --images DIR`` scores existing images (prompts from ``manifest.jsonl`` /
``metadata.jsonl`` in DIR, else from each PNG's metadata). Without ``--images`` it generates
``--n-per-prompt`` images for each prompt of ``--prompts`` (default: the shipped evaluation
prompts) with ``--model`` (default: the demo model), then scores them. Writes a JSON report
(per task, overall, per image, failures and skipped inputs with reasons) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ldm.cli import add_speed_arguments, apply_accel, sampler_help, schedule_help


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", choices=("shapes",), help="what to evaluate (the shapes world)")
    g = p.add_argument_group("what to score")
    g.add_argument("--images", metavar="DIR", help="score the images in DIR (no generation)")
    g.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: shipped 300)")
    g.add_argument("--report", metavar="FILE", help="JSON report path (default: see --outdir)")
    g.add_argument("--strict", action="store_true", help="objects not in the prompt also fail")
    g = p.add_argument_group("generation (without --images)")
    g.add_argument("--model", help="diffusers folder, single file or bundled name (default: "
                   "shapes-demo)")  # fmt: skip
    g.add_argument("--n-per-prompt", type=int, default=1, help="images per prompt (1)")
    g.add_argument("--outdir", help="save images + manifest.jsonl + report here")
    g.add_argument("--sampler", help=sampler_help())
    g.add_argument("--schedule", help=schedule_help())
    g.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    g.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale")
    g.add_argument("--eta", type=float, help="noise amount (default: the sampler's; TCD's gamma)")
    g.add_argument("--seed", type=int, default=0, help="image i uses seed + i (0)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, ... (cpu)")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default fp32 on cpu")
    g.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (8)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_speed_arguments(g)


def run(args: argparse.Namespace) -> int:
    from ldm.errors import LdmError
    from ldm.eval.report import collect_images, evaluate, format_table, write_report

    if args.images:
        if args.model or args.prompts:
            raise LdmError("--images scores existing images: drop --model/--prompts")
        items, skipped = collect_images(args.images)
        report = evaluate(items, strict=args.strict, skipped=skipped)
        report_path = Path(args.report or Path(args.images) / "shapes-report.json")
    else:
        items, skipped, defaults = _generate(args)
        report = evaluate(items, strict=args.strict, skipped=skipped)
        report["settings"] = _settings(args, defaults)
        report_path = Path(args.report or Path(args.outdir or ".") / "shapes-report.json")
    write_report(report_path, report)
    for s in report["skipped"]:
        where = f"line {s['line']}" if "line" in s else s.get("file", "?")
        print(f"skipped {where}: {s['reason']}", file=sys.stderr)
    print(format_table(report))
    print(f"report: {report_path}")
    return 0


def _settings(args: argparse.Namespace, defaults: dict) -> dict:
    """The run's settings; sampling ones not given are the model's (``sampling_defaults``)."""
    keys = ("model", "prompts", "n_per_prompt", "sampler", "schedule", "steps", "guidance_scale",
            "eta")  # fmt: skip
    out = {k: getattr(args, k) for k in (*keys, "seed", "dtype", "strict")}
    if args.sampler is None:  # the model's sampler comes with its schedule
        out["schedule"] = out["schedule"] or defaults["schedule"]
    for key in ("sampler", "steps", "guidance_scale"):
        out[key] = defaults[key] if out[key] is None else out[key]
    return out


def _generate(args: argparse.Namespace) -> tuple[list, list[dict], dict]:
    """Generate n-per-prompt images per prompt; image i of the run uses seed + i."""
    from tqdm import tqdm

    from ldm.cli.txt2img import load_model_flag
    from ldm.data.shapes import eval_prompts
    from ldm.errors import LdmError
    from ldm.eval.report import read_prompt_file

    if args.n_per_prompt < 1 or args.batch_size < 1:
        raise LdmError("--n-per-prompt and --batch-size must be at least 1")
    if args.prompts:
        lines, skipped = read_prompt_file(args.prompts)
        if not lines:
            raise LdmError(f"--prompts {args.prompts}: no prompt in the shapes grammar")
    else:
        lines, skipped = list(enumerate(eval_prompts(), 1)), []
    jobs = [text for _, text in lines for _ in range(args.n_per_prompt)]
    seeds = [args.seed + i for i in range(len(jobs))]
    options = {
        k: v
        for k in ("steps", "guidance_scale", "sampler", "schedule", "eta")
        if (v := getattr(args, k)) is not None
    }  # flags not given fall back to the pipeline's own defaults
    pipe = load_model_flag(args.model, args.device, args.dtype, None)
    if args.accel or args.verbose:  # else the pipeline applies $LDM_ACCEL or auto itself
        apply_accel(pipe, args)
    outdir = Path(args.outdir) if args.outdir else None
    if outdir:
        outdir.mkdir(parents=True, exist_ok=True)
    items, manifest = [], []
    bar = tqdm(total=len(jobs), unit="img", file=sys.stderr, disable=args.no_progress)
    try:
        for start in range(0, len(jobs), args.batch_size):
            batch = slice(start, start + args.batch_size)
            outs = pipe(jobs[batch], seeds[batch], height=64, width=64, **options)
            for i, (prompt, seed, out) in enumerate(zip(jobs[batch], seeds[batch], outs), start):
                name = f"{i:05d}-{seed}.png"
                if outdir:
                    _save(out, outdir / name)
                    manifest.append(json.dumps({"file_name": name, "text": prompt, "seed": seed}))
                items.append((name, prompt, out.image))
                bar.update(1)
    finally:
        bar.close()
    if outdir:
        from ldm.io import atomic_write_text

        atomic_write_text(outdir / "manifest.jsonl", "\n".join(manifest) + "\n")
    return items, skipped, pipe.sampling_defaults


def _save(out, path: Path) -> None:
    """PNG with the pipeline's A1111 infotext and ldm record (``ldm eval --images`` reads it)."""
    from ldm.infotext import infotext_from_record, save_png

    save_png(out.image, path, infotext_from_record(out.record), out.record)
