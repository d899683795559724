"""The ``ldm`` command: a thin argparse front over the library, one module per subcommand.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``. Only the
chosen subcommand's module is imported, so ``ldm --help`` and light commands start fast.
User errors (:class:`ldm.errors.LdmError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ldm.errors import LdmError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "txt2img": ("ldm.cli.txt2img", "generate images from a prompt (txt2img, img2img, inpaint)"),
    "batch": ("ldm.cli.batch", "generate many images from a prompt file, resumably"),
    "train": ("ldm.cli.train", "train or fine-tune a model from a YAML config"),
    "convert": ("ldm.cli.convert", "convert checkpoints (folder <-> single file) and LoRA files"),
    "shapes": ("ldm.cli.shapes", "the shapes world: export a procedural image-caption dataset"),
    "eval": ("ldm.cli.eval", "score images or a model with the shapes judge"),
    "serve": ("ldm.cli.serve", "serve A1111, ComfyUI and OpenAI image APIs and a web page"),
    "distill": ("ldm.cli.distill", "distill a model into a few-step LCM or TCD student"),
    "models": ("ldm.cli.models", "list the bundled models (usable by name as --model)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="latent text-to-image diffusion")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def int_list(text: str) -> list[int]:
    """An argparse type: "7,8,9" -> [7, 8, 9]."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 7,8,9, got {text!r}") from None


def sampler_help() -> str:
    """--sampler help, from the sampler table."""
    from ldm.sampling.samplers import SPECS

    names = ", ".join(s.name for s in SPECS)
    return f"{names}, or an A1111 name: 'Euler a', 'DPM++ 2M Karras', ... (dpmpp_2m)"


def schedule_help() -> str:
    from ldm.sampling.schedules import SIGMA_SCHEDULES

    return f"{', '.join(SIGMA_SCHEDULES)} (default: the checkpoint's own timestep spacing)"


def add_speed_arguments(g) -> None:
    """--accel and --verbose (ldm txt2img, batch, eval)."""
    from ldm.accel import ENV_VAR, MODES

    g.add_argument("--accel", choices=MODES, help=f"accelerator for the U-Net and VAE (default: "
                   f"${ENV_VAR}, else auto: measured best for the device)")  # fmt: skip
    g.add_argument("--verbose", action="store_true", help="say which accelerator was applied")


def apply_accel(pipe, args) -> None:
    """Apply the accelerator (after the LoRAs are merged); print the decision with --verbose."""
    decision = pipe.accelerate(args.accel)
    if args.verbose:
        print(f"ldm: accel: {decision.mode} ({decision.reason})", file=sys.stderr)


def _version() -> str:
    from ldm import __version__

    return f"ldm {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except LdmError as e:
        print(f"ldm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ldm: interrupted", file=sys.stderr)
        return 130


def entry(module_run, add_arguments, argv: list[str] | None = None, prog: str = "ldm") -> int:
    """Run one subcommand outside ``ldm`` (used by the thin ``scripts/*.py`` wrappers)."""
    parser = argparse.ArgumentParser(prog=prog)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(module_run(args) or 0)
    except LdmError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
