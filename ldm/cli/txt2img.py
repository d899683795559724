"""``ldm txt2img``: prompt -> PNGs with A1111 infotext and a JSON record (img2img, inpaint too).

Flags follow CompVis ``txt2img.py`` and diffusers. Modes: plain text-to-image; ``--init-image``
(+ ``--strength``) for img2img; ``--mask`` (white = repaint) for inpainting; ``--outpaint
L,R,U,D`` pads the init image by that many pixels on the left, right, top and bottom and paints
the new border. ``--from-png IMAGE`` re-renders an image from its embedded record; flags given
explicitly override the record. Image i of a request with seed s uses seed s + i. Unset sampling
flags take the model's stored defaults (``ldm_model.json``), else its family's; ``--model`` also
takes a bundled model's name (``ldm models``); ``--accel`` picks the accelerator. The paths
written are printed on stdout, one per line; the progress bar, the seed and notes go to stderr.
"""

from __future__ import annotations

import argparse
import math
import re
import secrets
import sys
from pathlib import Path

from ldm.cli import add_speed_arguments, apply_accel, sampler_help, schedule_help
from ldm.cli.flow_args import (
    FLOW_DEFAULTS,
    add_flow_arguments,
    checked_length,
    flow_kwargs,
)
from ldm.cli.from_png import settings_from_png
from ldm.errors import LdmError

MODEL_HELP = (
    "a diffusers folder, a .safetensors/.ckpt file, or a bundled model's name (`ldm "
    "models`; an existing path wins); default: shapes-demo"
)
# flag defaults; the parser's own default is None so --from-png can tell "given" from "default"
DEFAULTS = dict(
    prompt=None,
    negative_prompt="",
    steps=None,  # None: the model family's (ldm.models.families), 20 for SD 1.x/2.x
    guidance_scale=None,  # 7.5 for SD 1.x/2.x
    guidance_rescale=0.0,
    sampler=None,  # dpmpp_2m for SD 1.x/2.x
    schedule=None,  # the family's with its sampler, else "default"
    eta=None,
    height=None,
    width=None,
    clip_skip=1,
    strength=0.8,
    seed=None,
    model=None,
    refiner=None,  # SDXL: a refiner model that takes over at refiner_switch_at
    refiner_switch_at=0.8,
    micro=None,  # SDXL size/crop/aesthetic conditioning (ldm.text.micro), None: defaults
    **FLOW_DEFAULTS,  # shift, skip-layer guidance
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to draw")
    g.add_argument("--prompt", help="the text prompt (A1111 emphasis syntax, BREAK)")
    g.add_argument("--negative-prompt", help="what to steer away from (default: empty)")
    g.add_argument("--from-png", metavar="IMAGE", help="re-render a PNG from its embedded record")
    g = p.add_argument_group("model and device")
    g.add_argument("--model", help=MODEL_HELP)
    add_config_argument(g)
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default fp16 cuda, fp32 cpu")
    g.add_argument("--clip-skip", type=int, help="use the output of the n-th last CLIP layer (1)")
    g.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        default=[],
        help="merge a LoRA (diffusers/PEFT or kohya file) with an optional scale; repeatable",
    )
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, help="sampler steps (the model family's: 20 for SD)")
    g.add_argument("--guidance-scale", "--scale", type=float, help="CFG scale; <= 1 is off (7.5)")
    g.add_argument("--guidance-rescale", type=float, help="CFG rescale phi, Lin et al. 2023 (0)")
    g.add_argument("--sampler", help=sampler_help())
    g.add_argument("--schedule", help=schedule_help())
    g.add_argument("--eta", type=float, help="noise amount (default: DDIM 0, ancestral/SDE 1)")
    g.add_argument("--seed", type=int, help="seed of the first image (random if omitted)")
    g.add_argument("--height", "--H", type=int, help="pixels (default: the model's size)")
    g.add_argument("--max-size", type=int, default=4096, help="largest side in pixels (4096)")
    g.add_argument("--width", "--W", type=int, help="pixels (default: the model's size)")
    g.add_argument("--n-samples", type=int, default=1, help="images per batch (1)")
    g.add_argument("--n-iter", type=int, default=1, help="number of batches (1)")
    g = p.add_argument_group("img2img, inpainting, outpainting")
    g.add_argument("--init-image", help="start from this image (img2img)")
    g.add_argument("--strength", type=float, help="how much of the init image to redo (0.8)")
    g.add_argument("--mask", help="inpainting mask: white = repaint, black = keep")
    g.add_argument("--outpaint", metavar="L,R,U,D", help="pad the init image by these pixels")
    g = p.add_argument_group("SDXL")
    g.add_argument("--refiner", metavar="MODEL", help="hand over to this refiner model")
    g.add_argument(
        "--refiner-switch-at",
        type=float,
        metavar="F",
        help="share of the noise the base removes before the refiner (0.8)",
    )
    g.add_argument("--original-size", metavar="HxW", help="size conditioning (default: output)")
    g.add_argument("--target-size", metavar="HxW", help="size conditioning (default: output)")
    g.add_argument("--crop", metavar="TOP,LEFT", help="crop conditioning (default: 0,0)")
    g.add_argument("--aesthetic-score", type=float, help="refiner conditioning (6.0)")
    g.add_argument("--negative-aesthetic-score", type=float, help="refiner conditioning (2.5)")
    add_flow_arguments(p)
    g = p.add_argument_group("output, memory and speed")
    g.add_argument("--outdir", default="outputs/txt2img", help="(default: outputs/txt2img)")
    g.add_argument("--grid", action="store_true", help="also write a grid of all images")
    g.add_argument("--vae-tiling", action="store_true", help="decode large images in tiles")
    add_offload_argument(g)
    add_speed_arguments(g)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ldm.modes import load_image

    settings = _settings(args)
    _check_flags(args, settings)
    init_image = mask = None
    if args.init_image:
        init_image = load_image(args.init_image, "--init-image")
    if args.mask:
        mask = load_image(args.mask, "--mask")
    seed_is_random = settings["seed"] is None
    if seed_is_random:
        settings["seed"] = secrets.randbelow(2**32)  # printed once generation starts

    pipe = load_model_flag(
        settings["model"], args.device, args.dtype, args.config, args.no_t5, args.offload
    )
    if args.max_sequence_length is not None:  # else the model's (SD3 256, FLUX.1-dev 512)
        pipe.max_sequence_length = checked_length(args.max_sequence_length)
    refiner = None
    if settings["refiner"]:
        refiner = load_model_flag(settings["refiner"], args.device, args.dtype, None)
        apply_accel(refiner, args)
    for spec in settings["lora"]:
        from ldm.formats.lora import parse_lora_arg

        report = pipe.apply_lora(*parse_lora_arg(spec))
        if report.warning():
            print(f"ldm: warning: {report.warning()}", file=sys.stderr)
    apply_accel(pipe, args)
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    if args.outpaint:
        from ldm.modes import outpaint_canvas, parse_outpaint

        init_image, mask = outpaint_canvas(init_image, parse_outpaint(args.outpaint), pipe.factor)
        settings["strength"] = 1.0  # the new border has no content to keep
        settings["height"], settings["width"] = init_image.height, init_image.width

    results = _generate(pipe, args, settings, init_image, mask, seed_is_random, refiner)
    if args.outpaint:
        for result in results:
            result.record.update(mode="outpaint", outpaint=args.outpaint)
    paths = _save_all(results, Path(args.outdir), args)
    for path in paths:
        print(path)
    return 0


def add_config_argument(g) -> None:
    g.add_argument(
        "--config",
        metavar="FOLDER_OR_YAML",
        help="a single file's model config (a diffusers folder or an original YAML), for files "
        "whose shape ldm cannot infer; files ldm wrote carry theirs",
    )


def add_offload_argument(g) -> None:
    g.add_argument(
        "--offload",
        choices=("none", "model", "sequential"),
        help="GPU memory: weights in CPU RAM, each part (model) or module (sequential) on the "
        "GPU only while it runs; GPUs only, docs/flux.md (none)",
    )


def load_model_flag(model, device, dtype, config, no_t5: bool = False, offload=None):
    """``load_pipeline``, with ``--config`` for a single file (ldm.loading.load_model)."""
    from ldm.loading import load_model, resolve_device, resolve_dtype
    from ldm.offload import check_offload
    from ldm.pipeline import load_pipeline

    if config is None:
        return load_pipeline(model, device=device, dtype=dtype, t5=not no_t5, offload=offload)
    from ldm.pipeline import Pipeline

    if model is None:
        raise LdmError("--config needs --model (a single file)")
    if not Path(config).exists():
        raise LdmError(f"--config {config}: no such file or folder")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    offload = check_offload(offload, device)
    home = "cpu" if offload != "none" else device  # offloaded weights are read into CPU RAM
    parts = load_model(model, home, torch_dtype, config=config, t5=not no_t5)
    pipe = Pipeline(parts, device, torch_dtype)
    pipe.enable_offload(offload)
    return pipe


def _settings(args: argparse.Namespace) -> dict:
    """Defaults, then the record of --from-png, then the flags given explicitly."""
    settings = dict(DEFAULTS, lora=[])  # lora: FILE[:SCALE] specs
    if args.from_png:
        settings.update(settings_from_png(args.from_png, args.init_image, args.mask))
        outpaint = settings.pop("outpaint", None)
        if outpaint and not args.outpaint and not args.mask:  # the recorded pads, unless overridden
            args.outpaint = outpaint
    for key in DEFAULTS:
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    if args.lora:
        settings["lora"] = list(args.lora)
    micro = _micro_flags(args)
    if micro:
        settings["micro"] = {**(settings["micro"] or {}), **micro}
    return settings


def _micro_flags(args: argparse.Namespace) -> dict:
    """--original-size/--target-size HxW, --crop TOP,LEFT, aesthetic scores -> micro fields."""
    out = {}
    for flag, key, sep in (("original_size", "original_size", "x"),
                           ("target_size", "target_size", "x"),
                           ("crop", "crops_coords_top_left", ",")):  # fmt: skip
        value = getattr(args, flag, None)
        if value is None:
            continue
        parts = value.lower().split(sep)
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            example = "1024x1024" if sep == "x" else "0,0"
            raise LdmError(f"--{flag.replace('_', '-')} {value!r}: expected e.g. {example}")
        out[key] = [int(p) for p in parts]
    for key in ("aesthetic_score", "negative_aesthetic_score"):
        if getattr(args, key, None) is not None:
            out[key] = getattr(args, key)
    return out


def _check_flags(args: argparse.Namespace, s: dict) -> None:
    """Cheap checks before the model loads (the pipeline checks the rest before writing)."""
    from ldm.request import check_sampler, check_schedule

    if not s["prompt"] and s["prompt"] != "":
        raise LdmError("--prompt is required (or --from-png IMAGE)")
    if s["steps"] is not None and s["steps"] < 1:
        raise LdmError(f"--steps must be >= 1, got {s['steps']}")
    for flag, size in (("--height", s["height"]), ("--width", s["width"])):
        if size is not None and size <= 0:
            raise LdmError(f"{flag} must be a positive number of pixels, got {size}")
        if size is not None and size > args.max_size:
            raise LdmError(f"{flag} {size} is larger than --max-size {args.max_size}")
    for flag, n in (("--n-samples", args.n_samples), ("--n-iter", args.n_iter)):
        if n < 1:
            raise LdmError(f"{flag} must be >= 1, got {n}")
    if s["guidance_scale"] is not None and not math.isfinite(s["guidance_scale"]):
        raise LdmError(f"--guidance-scale must be a finite number, got {s['guidance_scale']}")
    if s["sampler"] is not None:
        check_sampler(s["sampler"], s["schedule"] or "default")
    if s["schedule"] is not None:
        check_schedule(s["schedule"])
    from ldm.models.bundled import resolve_model

    for key in ("model", "refiner"):
        if s[key] is not None:
            resolve_model(s[key], f"--{key}")
    if s["refiner"] and args.offload not in (None, "none"):
        raise LdmError("--offload does not combine with --refiner yet (two models' parts)")
    if s["refiner"] and (args.init_image or args.mask or args.outpaint):
        raise LdmError("--refiner works with txt2img (no --init-image, --mask or --outpaint)")
    if (args.mask or args.outpaint) and not args.init_image:
        raise LdmError(f"{'--mask' if args.mask else '--outpaint'} needs --init-image")
    if args.mask and args.outpaint:
        raise LdmError("--mask and --outpaint cannot be combined (outpaint makes its own mask)")
    from ldm.formats.lora import parse_lora_arg

    for spec in s["lora"]:
        path, _ = parse_lora_arg(spec)
        if not Path(path).is_file():
            raise LdmError(f"--lora {spec}: no such file")


def _generate(pipe, args, s: dict, init_image, mask, seed_is_random: bool, refiner=None) -> list:
    """n_iter batches of n_samples images; image k overall gets seed + k."""
    from tqdm import tqdm

    from ldm.text.micro import MicroConditioning

    n = args.n_samples
    bar = None

    def on_step(step: int, num_steps: int) -> None:
        # made at the first step, so a request the pipeline rejects prints only its error
        nonlocal bar
        if bar is None:
            if seed_is_random:
                print(f"seed: {s['seed']}", file=sys.stderr)
            total = args.n_iter * num_steps  # img2img runs fewer steps than --steps
            bar = tqdm(total=total, unit="step", file=sys.stderr, disable=args.no_progress)
        bar.update(1)

    results = []
    try:
        for i in range(args.n_iter):
            seeds = [s["seed"] + i * n + j for j in range(n)]
            kwargs = dict(
                negative_prompt=s["negative_prompt"], steps=s["steps"],
                guidance_scale=s["guidance_scale"], guidance_rescale=s["guidance_rescale"],
                sampler=s["sampler"], schedule=s["schedule"], eta=s["eta"],
                height=s["height"], width=s["width"], clip_skip=s["clip_skip"],
                micro=MicroConditioning(**s["micro"]) if s["micro"] else None, callback=on_step,
            )  # fmt: skip
            kwargs.update(flow_kwargs(s))  # shift, SD3.5 skip layers
            if refiner is not None:
                from ldm.refiner import generate_with_refiner

                results += generate_with_refiner(
                    pipe, refiner, [s["prompt"]] * n, seeds,
                    switch_at=s["refiner_switch_at"], **kwargs,
                )  # fmt: skip
            else:
                results += pipe(
                    [s["prompt"]] * n, seeds, init_image=init_image, strength=s["strength"],
                    mask=mask, **kwargs,
                )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    return results


def _save_all(results: list, outdir: Path, args) -> list[Path]:
    from ldm.grid import image_grid
    from ldm.infotext import infotext_from_record, save_png

    paths = []
    for result in results:
        record = result.record
        name = f"{record['seed']}-{_slug(record['prompt'])}.png"
        path = _free_path(outdir, name)
        save_png(result.image, path, infotext_from_record(record), record)
        paths.append(path)
    if args.grid and len(results) > 1:
        grid = image_grid([r.image for r in results], args.n_samples, pad=0)
        record = dict(results[0].record, grid_seeds=[r.record["seed"] for r in results])
        path = _free_path(outdir, f"grid-{_slug(record['prompt'])}.png")
        save_png(grid, path, infotext_from_record(results[0].record), record)
        paths.append(path)
    return paths


def _slug(prompt: str, length: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:length].rstrip("-") or "image"


def _free_path(outdir: Path, name: str) -> Path:
    """``NNNNN-name`` with NNNNN one past the highest number in outdir: nothing is overwritten."""
    outdir.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in outdir.iterdir() if (m := re.match(r"(\d{5,})-", p.name))]
    index = max(numbers, default=-1) + 1
    while (path := outdir / f"{index:05d}-{name}").exists():
        index += 1
    return path
