"""Accelerators behind one switch: ``apply(module, mode)`` speeds up a loaded model in place.

Model files (``ldm/models``) are plain ``torch.nn``; hardware-specific speed-ups live here and are
applied after loading (and after LoRA merging). Modes: ``ldm-cpu`` (ldm's own CPU GEMM routes),
``inductor`` (``torch.compile``), ``openvino`` (converted model cached on disk), ``off`` (plain),
``auto`` (a rule decided by measurement, docs/benchmarks.md). State dicts are never changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.errors import LdmError

MODES = ("auto", "ldm-cpu", "inductor", "openvino", "off")
ENV_VAR = "LDM_ACCEL"


@dataclass
class Decision:
    """What ``apply`` did and why (printed with ``--verbose``, recorded in the image's JSON)."""

    mode: str  # what was actually applied: one of MODES minus "auto"
    reason: str  # one line: why


def resolve(mode: str | None, device: torch.device, dtype: torch.dtype) -> Decision:
    """The mode to apply: ``mode``, else env ``LDM_ACCEL``, else ``auto`` (rule in docs)."""
    requested = mode if mode is not None else os.environ.get(ENV_VAR) or "auto"
    if requested not in MODES:
        raise LdmError(f"unknown accelerator {requested!r}; choose one of {', '.join(MODES)}")
    if requested != "auto":
        return Decision(requested, f"{requested}: requested")
    return Decision("off", "auto: not implemented yet -> off")


def apply(
    module: torch.nn.Module,
    mode: str | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    training: bool = False,
    cache_dir: Path | None = None,
) -> Decision:
    """Speed ``module`` up in place for ``device``/``dtype``; state_dict() is unchanged."""
    decision = resolve(mode, torch.device(device), dtype)
    return decision
