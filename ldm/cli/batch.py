"""``ldm batch``: many images from a prompt file, resumable, sharded over processes/GPUs.

The prompt file is plain text (one prompt per line, or A1111-style ``--prompt "..." --seed 5``
lines), JSONL or CSV (see :mod:`ldm.batch.jobs`); the txt2img flags give the defaults. Every job is
validated before the first image. Re-running the same command resumes: finished images (checked
against ``manifest.jsonl`` and their sha256) are skipped. Shard over N processes with
``accelerate launch --num_processes N -m ldm batch ...`` (``--cpu`` for CPU processes); the union
of their outputs equals a single-process run. On CPU, where ``accelerate launch --cpu`` starts one
process unless MPI is set up, use ``accelerate launch --multi_gpu --num_processes N -m ldm batch
--device cpu ...`` or ``torchrun --nproc_per_node N -m ldm batch ...``. Exit status 1 when some
images failed (they are listed in the manifest with the reason). A second run on a folder that a
live run works on is refused (exit 2), or with ``--join`` shares its work (ldm.batch.lock).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from ldm.cli import add_speed_arguments, apply_accel, sampler_help, schedule_help
from ldm.cli.flow_args import checked_length
from ldm.cli.txt2img import MODEL_HELP, add_config_argument, load_model_flag
from ldm.errors import LdmError

# flag dest -> job parameter (the flags are defaults; a prompt file line overrides them)
FLAG_PARAMS = ("negative_prompt", "seed", "steps", "guidance_scale", "guidance_rescale", "sampler",
               "schedule", "eta", "height", "width", "clip_skip", "init_image", "mask",
               "strength", "shift", "true_cfg_scale")  # fmt: skip
SHOW_INVALID = 50


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("jobs")
    g.add_argument("--prompts", required=True, metavar="FILE", help="text, .jsonl or .csv")
    g.add_argument("--seeds", help="seeds for every prompt without its own, e.g. 1,2,3")
    g.add_argument("--n-per-prompt", type=int, help="images per prompt: seeds s, s+1, ... (1)")
    g.add_argument(
        "--sweep", action="append", default=[], metavar="KEY=V1,V2",
        help="cross product of values, e.g. guidance_scale=5,7.5 (repeatable)",
    )  # fmt: skip
    g.add_argument("--skip-invalid", action="store_true", help="skip invalid lines, say so, go on")
    g = p.add_argument_group("model and device")
    g.add_argument("--model", help=MODEL_HELP)
    add_config_argument(g)
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: this process's accelerator)")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default fp16 cuda, fp32 cpu")
    g.add_argument("--clip-skip", type=int, help="use the output of the n-th last CLIP layer (1)")
    g = p.add_argument_group("defaults for every job (a prompt file line overrides them)")
    g.add_argument("--negative-prompt", help="what to steer away from (default: empty)")
    g.add_argument("--steps", type=int, help="sampler steps (the model family's: 20 for SD)")
    g.add_argument("--guidance-scale", "--scale", type=float, help="CFG scale; <= 1 is off (7.5)")
    g.add_argument("--guidance-rescale", type=float, help="CFG rescale phi (0)")
    g.add_argument("--sampler", help=sampler_help())
    g.add_argument("--schedule", help=schedule_help())
    g.add_argument("--eta", type=float, help="noise amount (default: DDIM 0, ancestral/SDE 1)")
    g.add_argument("--seed", type=int, help="seed of prompts without their own (0)")
    g.add_argument("--height", "--H", type=int, help="pixels (default: the model's size)")
    g.add_argument("--width", "--W", type=int, help="pixels (default: the model's size)")
    g.add_argument("--init-image", help="start every job from this image (img2img)")
    g.add_argument("--strength", type=float, help="how much of the init image to redo (0.8)")
    g.add_argument("--mask", help="inpainting mask: white = repaint, black = keep")
    g.add_argument("--shift", type=float, help="flow models' time shift (the checkpoint's: 3)")
    g.add_argument("--true-cfg-scale", type=float,
                   help="FLUX.1-dev: CFG with the negative prompt over the embedded guidance "
                        "(--guidance-scale); 2 passes per step (off)")  # fmt: skip
    g.add_argument("--no-t5", action="store_true", help="SD3: leave T5-XXL unread (zeros)")
    g.add_argument("--max-sequence-length", type=int, help="T5 tokens (the model's; <= 512)")
    g = p.add_argument_group("output and throughput")
    g.add_argument("--outdir", default="outputs/batch", help="(default: outputs/batch)")
    g.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (4)")
    g.add_argument(
        "--join", action="store_true",
        help="share the work of a run already writing to --outdir (same command): make the "
        "batches it has not claimed; without it such a run is refused",
    )  # fmt: skip
    g.add_argument("--grid", action="store_true", help="a labelled grid per prompt (grids/)")
    g.add_argument("--max-size", type=int, default=4096, help="largest side in pixels (4096)")
    g.add_argument("--vae-tiling", action="store_true", help="decode large images in tiles")
    add_speed_arguments(g)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ldm.batch.jobs import JobSpec, parse_seeds, parse_sweep

    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    # 1. flags, before anything slow
    if args.batch_size < 1:
        raise LdmError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.n_per_prompt is not None and args.n_per_prompt < 1:
        raise LdmError(f"--n-per-prompt must be >= 1, got {args.n_per_prompt}")
    if args.seeds and args.n_per_prompt:
        raise LdmError("--seeds and --n-per-prompt cannot be combined (--seeds lists them all)")
    if not Path(args.prompts).is_file():
        raise LdmError(f"--prompts {args.prompts}: no such file")
    if args.model is not None:
        from ldm.models.bundled import resolve_model

        resolve_model(args.model)  # a path or a bundled name, else a one-line error
    sweeps = [parse_sweep(s) for s in args.sweep]
    if len({k for k, _ in sweeps}) != len(sweeps):
        raise LdmError("--sweep: each key may be swept once")
    seeds = parse_seeds(args.seeds) if args.seeds else None
    defaults = {k: getattr(args, k) for k in FLAG_PARAMS}
    rank, world, state = _processes(args.device)
    main = rank == 0
    if not args.join:  # refused at once when a live run holds the folder (checked again below)
        _on_main(state, main, lambda: _refuse_if_busy(Path(args.outdir)))

    # 2. the model, then every job validated before the first image
    device = args.device or (state.device if state is not None else None)
    pipe = load_model_flag(args.model, device, args.dtype, args.config, args.no_t5)
    if args.max_sequence_length is not None:
        pipe.max_sequence_length = checked_length(args.max_sequence_length)
    _model_defaults(defaults, pipe.sampling_defaults)
    apply_accel(pipe, args)
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    spec = JobSpec(
        defaults, seeds, args.n_per_prompt, sweeps, factor=pipe.factor,
        default_size=pipe.default_size, max_size=args.max_size,
        scheduler_config=pipe.parts.scheduler_config,
    )  # fmt: skip
    num_jobs = _validate(args, spec, main)

    # 3. the output folder: registered by rank 0 (refused if busy; leftovers of dead runs
    # cleared), then by the other ranks as members of its run
    from ldm.batch.lock import Claims, Lease, this_process

    outdir = Path(args.outdir)
    me = this_process(started, _signature(args, spec, pipe))
    got = _on_main(state, main, lambda: _register(outdir, me, args.join), lambda x: x.joined)
    lease = got if main else Lease.acquire(outdir, me, member=True)
    joined = lease.joined if main else got
    try:
        summary = _run(args, spec, pipe, outdir, rank, world, Claims(outdir), joined)

        # 4. summary (and grids, once every process is done)
        _print_summary(summary, rank, world)
        _barrier(state)
        if main and args.grid:
            from ldm.batch.grid import write_grids

            grids = write_grids(_jobs(args, spec), outdir)
            print(f"ldm batch: {len(grids)} grid(s) written to {outdir / 'grids'}",
                  file=sys.stderr)  # fmt: skip
        if main and world > 1:
            _print_totals(outdir, num_jobs)
    finally:
        lease.release()
    return 1 if summary.failed else 0


def _jobs(args, spec):
    from ldm.batch.jobs import Job, iter_jobs

    return (j for j in iter_jobs(args.prompts, spec) if isinstance(j, Job))


def _run(args, spec, pipe, outdir, rank, world, claims, joined: bool):
    from ldm.batch.run import run_batches

    bar = _Bar(args.no_progress, rank, world)
    try:
        return run_batches(
            pipe, lambda: _jobs(args, spec), outdir, batch_size=args.batch_size, rank=rank,
            world=world, claims=claims, every_batch=joined, on_plan=bar.start, on_image=bar.update,
        )  # fmt: skip
    finally:
        bar.close()


def _refuse_if_busy(outdir: Path) -> None:
    from ldm.batch.lock import busy, refusal

    live = busy(outdir)
    if live:
        raise refusal(outdir, live)


def _register(outdir: Path, me, join: bool):
    """Rank 0: register on the folder (a Lease); if it joined a live run, every rank does."""
    from ldm.batch.lock import Lease

    try:
        lease = Lease.acquire(outdir, me, join=join)
    except OSError as e:  # not a folder, no permission, read-only filesystem
        raise LdmError(f"--outdir {outdir}: cannot write there ({e.strerror or e})") from e
    for gone in lease.gone:
        print(f"ldm batch: took over {outdir}: the run that held it is gone ({gone.describe()})",
              file=sys.stderr)  # fmt: skip
    if lease.joined:
        print(f"ldm batch: joined the run on {outdir} ({lease.others[0].describe()})",
              file=sys.stderr)  # fmt: skip
    elif join:
        print(f"ldm batch: --join: no live run on {outdir}; starting one", file=sys.stderr)
    return lease


def _signature(args, spec, pipe) -> str:
    """What decides the images and their batches: joiners must have the same (sha256)."""
    digest = hashlib.sha256()
    with open(args.prompts, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    fields = dict(spec=dataclasses.asdict(spec), batch_size=args.batch_size,
                  model=pipe.model_hash, loras=pipe.loras, dtype=str(pipe.dtype),
                  no_t5=args.no_t5, max_sequence_length=pipe.max_sequence_length)  # fmt: skip
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _on_main(state, main: bool, fn, public=lambda result: result):
    """``fn()`` on rank 0, which gets its result; the other ranks get ``public(result)``, or
    all raise its LdmError (a refusal stops the whole run, not only rank 0)."""
    if state is None:
        return fn()
    from accelerate.utils import broadcast_object_list

    result, outcome = None, [None, None]
    if main:
        try:
            result = fn()
            outcome = [public(result), None]
        except LdmError as e:
            outcome = [None, str(e)]
    shared, error = broadcast_object_list(outcome)
    if error is not None:
        raise LdmError(error)
    return result if main else shared


def _model_defaults(defaults: dict, model: dict) -> None:
    """The sampler, schedule, steps and guidance where no flag set them, by the pipeline's rule
    (``ldm.request.resolve_sampling``): the model's (stored, else its family's), or a few-step
    sampler's own when one is asked for."""
    from ldm.request import resolve_sampling

    keys = ("sampler", "schedule", "steps", "guidance_scale")
    spec, *rest = resolve_sampling(model, *(defaults[k] for k in keys))
    defaults.update(zip(keys, (spec.name, *rest), strict=True))


def _validate(args, spec, main: bool) -> int:
    from ldm.batch.jobs import validate

    num_jobs, invalid, num_invalid = validate(args.prompts, spec, keep=SHOW_INVALID)
    if num_invalid:
        if main:
            what = "skipped" if args.skip_invalid else "invalid"
            for item in invalid:
                print(f"ldm: {what}: {args.prompts}:{item.line}: {item.message}", file=sys.stderr)
            if num_invalid > len(invalid):
                print(f"ldm: ... and {num_invalid - len(invalid)} more", file=sys.stderr)
        if not args.skip_invalid:
            first = invalid[0]
            raise LdmError(
                f"{args.prompts}: {num_invalid} invalid entr{'y' if num_invalid == 1 else 'ies'} "
                f"(first at line {first.line}: {first.message}); nothing was generated; fix them "
                "or pass --skip-invalid"
            )
    if num_jobs == 0:
        raise LdmError(f"--prompts {args.prompts}: no valid prompts in the file")
    if main:
        skipped = f", {num_invalid} invalid entries skipped" if num_invalid else ""
        print(f"ldm batch: {num_jobs} images to make{skipped}", file=sys.stderr)
    return num_jobs


def _processes(device: str | None):
    """(rank, world size, accelerate PartialState or None) of this process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    # without cpu=True, PartialState on a machine without CUDA silently makes one process of all
    cpu = (device or "").startswith("cpu") or not torch.cuda.is_available()
    # a process that finishes early waits at the final barrier for the others: no short timeout
    state = PartialState(cpu=cpu, timeout=timedelta(days=7))
    return state.process_index, state.num_processes, state


def _barrier(state) -> None:
    if state is not None:
        state.wait_for_everyone()


class _Bar:
    """tqdm bar of images: done/total, images/s, ETA (one per process when sharded)."""

    def __init__(self, disable: bool, rank: int, world: int):
        self.disable, self.rank, self.world, self.bar = disable, rank, world, None

    def start(self, total: int, done: int) -> None:
        from tqdm import tqdm

        desc = f"rank {self.rank}" if self.world > 1 else "batch"
        self.bar = tqdm(total=total, initial=done, unit="img", desc=desc, file=sys.stderr,
                        disable=self.disable, position=self.rank, dynamic_ncols=True)  # fmt: skip

    def update(self, event) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if event.status == "failed":
                self.bar.write(f"ldm: failed: {event.name}: {event.error}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_summary(s, rank: int, world: int) -> None:
    who = f"rank {rank}: " if world > 1 else ""
    others = f", {s.others} made meanwhile by another process" if s.others else ""
    print(
        f"ldm batch: {who}{s.made} made, {s.skipped} already done, {s.adopted} recovered, "
        f"{s.failed} failed of {s.total}{others} in {s.seconds:.1f} s "
        f"({s.images_per_s:.2f} images/s); text encodings: {s.encoded} computed, "
        f"{s.reused} reused",
        file=sys.stderr,
    )
    for name, reason in s.failures[:20]:
        print(f"ldm batch: failed: {name}: {reason}", file=sys.stderr)


def _print_totals(outdir: Path, num_jobs: int) -> None:
    from ldm.batch import manifest

    entries = manifest.read(outdir).values()
    ok = sum(e.get("status") == "ok" for e in entries)
    failed = sum(e.get("status") == "failed" for e in entries)
    print(f"ldm batch: all processes: {ok} of {num_jobs} images finished, {failed} failed",
          file=sys.stderr)  # fmt: skip
