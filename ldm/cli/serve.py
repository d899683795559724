"""``ldm serve``: the A1111 / ComfyUI / OpenAI-images server and its web page (docs/serve.md).

Binds 127.0.0.1:7860 by default; ``--listen`` (all addresses) or another ``--host`` needs
``--api-auth user:pass`` or ``--api-token``. The first ``--model`` is loaded before the port
opens, so a bad model is a one-line error; Ctrl-C stops cleanly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.cli import add_speed_arguments
from ldm.errors import LdmError


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and device")
    g.add_argument(
        "--model",
        action="append",
        default=[],
        help="diffusers folder, .safetensors/.ckpt or bundled name (ldm models); repeat to "
        "offer several (default: the demo model)",
    )
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default fp16 cuda, fp32 cpu")
    add_speed_arguments(g)
    g = p.add_argument_group("network and security")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    g.add_argument("--port", type=int, default=7860, help="port (7860, as A1111)")
    g.add_argument("--listen", action="store_true", help="bind 0.0.0.0 (needs --api-auth or "
                   "--api-token)")  # fmt: skip
    g.add_argument("--api-auth", metavar="USER:PASS", help="HTTP Basic credentials for every route")
    g.add_argument("--api-token", metavar="TOKEN", help="Bearer token for every route")
    g.add_argument("--cors-allow-origins", default="", metavar="ORIGINS",
                   help="comma-separated origins whose pages may call the API (none)")  # fmt: skip
    g = p.add_argument_group("queue, limits and output")
    g.add_argument("--queue-size", type=int, default=8, help="jobs waiting before 503 (8)")
    g.add_argument("--max-pixels", type=int, default=2048 * 2048, help="width x height (2048^2)")
    g.add_argument("--max-size", type=int, default=4096, help="largest side in pixels (4096)")
    g.add_argument("--max-steps", type=int, default=150, help="sampler steps (150)")
    g.add_argument("--max-batch", type=int, default=8, help="images in one pipeline call (8)")
    g.add_argument("--max-images", type=int, default=16, help="images per request (16)")
    g.add_argument("--max-body-mb", type=float, default=32, help="request body in MiB (32)")
    g.add_argument("--max-prompt-chars", type=int, default=20_000, help="prompt length (20000)")
    g.add_argument("--outdir", default="outputs/serve", help="(default: outputs/serve)")


def config_from_args(args: argparse.Namespace):
    from ldm.serve.config import Limits, ServeConfig, parse_auth

    limits = Limits(max_pixels=args.max_pixels, max_side=args.max_size, max_steps=args.max_steps,
                    max_batch=args.max_batch, max_images=args.max_images,
                    max_body=int(args.max_body_mb * (1 << 20)),
                    max_prompt=args.max_prompt_chars)  # fmt: skip
    for name, value in vars(limits).items():
        if value < 1:
            raise LdmError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    origins = [o.strip().rstrip("/") for o in args.cors_allow_origins.split(",") if o.strip()]
    config = ServeConfig(
        host="0.0.0.0" if args.listen else args.host, port=args.port,
        auth=parse_auth(args.api_auth), token=args.api_token or None, cors_origins=origins,
        queue_size=args.queue_size, outdir=Path(args.outdir), limits=limits,
    )  # fmt: skip
    config.check()
    return config


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from ldm.serve.app import Server
    from ldm.serve.models import ModelTable
    from ldm.serve.runner import serve

    models = ModelTable(args.model, device=args.device, dtype=args.dtype, accel=args.accel)
    pipe = models.pipeline(models.selected)  # load now: a bad model fails before the port opens
    if args.verbose:
        print(f"ldm: accel: {pipe.accel.mode} ({pipe.accel.reason})", file=sys.stderr)
    server = Server(config, models)
    print(f"ldm serve: {models.selected} on http://{config.host}:{config.port}/ "
          "(A1111 /sdapi/v1, ComfyUI /prompt, OpenAI /v1/images/generations); Ctrl-C stops",
          file=sys.stderr)  # fmt: skip
    try:
        serve(server)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C after its clean shutdown
        pass
    print("ldm serve: stopped", file=sys.stderr)
    return 0
