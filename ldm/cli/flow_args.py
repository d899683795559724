"""The SD3 / flow-model flags of ``ldm txt2img``: time shift, T5 and SD3.5 skip-layer guidance.

Kept beside txt2img's other groups so the flow models' settings are declared once: the parser
group, the keys ``--from-png`` reads back, and the keyword arguments handed to the pipeline.
"""

from __future__ import annotations

import argparse

from ldm.cli import int_list

SKIP_LAYER_KEYS = ("skip_layers", "skip_layer_scale", "skip_layer_start", "skip_layer_stop")
# flag defaults (None: the checkpoint's shift; skip-layer guidance off)
FLOW_DEFAULTS = dict(
    skip_layers=None,  # SD3.5 skip-layer guidance blocks, e.g. [7, 8, 9]
    skip_layer_scale=2.8,
    skip_layer_start=0.01,
    skip_layer_stop=0.2,
    shift=None,  # flow models: the checkpoint's static shift
    true_cfg_scale=None,  # FLUX.1-dev: CFG over its embedded guidance (None: off)
)


def add_flow_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SD3")
    g.add_argument("--shift", type=float, help="flow models' time shift (the checkpoint's: 3)")
    g.add_argument("--no-t5", action="store_true", help="leave T5-XXL unread (zeros, as diffusers)")
    g.add_argument("--max-sequence-length", type=int, help="T5 tokens (the model's; <= 512)")
    g.add_argument("--skip-layers", type=int_list, metavar="7,8,9",
                   help="SD3.5 skip-layer guidance: blocks left out of a 3rd pass")  # fmt: skip
    g.add_argument("--skip-layer-scale", type=float, help="its scale (2.8)")
    g.add_argument("--skip-layer-start", type=float, help="share of the steps it starts at (0.01)")
    g.add_argument("--skip-layer-stop", type=float, help="share of the steps it stops at (0.2)")
    g.add_argument("--true-cfg-scale", type=float,
                   help="FLUX.1-dev: CFG with the negative prompt over the embedded guidance "
                        "(--guidance-scale); 2 passes per step (off)")  # fmt: skip


def flow_kwargs(settings: dict) -> dict:
    """The pipeline keywords of the flow flags that were set (a U-Net model refuses them)."""
    kwargs = {}
    if settings["shift"] is not None:
        kwargs["shift"] = settings["shift"]
    if settings["skip_layers"]:
        kwargs.update({k: settings[k] for k in SKIP_LAYER_KEYS})
    if settings["true_cfg_scale"] is not None:
        kwargs["true_cfg_scale"] = settings["true_cfg_scale"]
    return kwargs


def checked_length(n: int) -> int:
    """--max-sequence-length, checked (1..512) by the SD3 text module."""
    from ldm.text.sd3 import check_max_sequence_length

    return check_max_sequence_length(n)
