"""Accelerators behind one switch: ``apply(module, mode)`` speeds up a loaded model in place.

Model files (``ldm/models``) are plain ``torch.nn``; speed-ups for a kind of hardware live here
and are applied after loading (and after LoRA merging): ``ldm-cpu`` (ldm's own CPU GEMM routes,
``cpu.py``), ``inductor`` (``torch.compile``), ``openvino`` (converted model cached on disk,
``openvino.py``), ``off`` (the plain modules). ``auto`` is a rule decided by measurement
(``_auto``; figures in docs/benchmarks.md). State dicts are never changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.accel import openvino
from ldm.accel.cpu import apply_ldm_cpu
from ldm.errors import LdmError

MODES = ("auto", "ldm-cpu", "inductor", "openvino", "off")
ENV_VAR = "LDM_ACCEL"


@dataclass
class Decision:
    """What ``apply`` did and why (printed with ``--verbose``, recorded in the image's JSON)."""

    mode: str  # what was actually applied: one of MODES minus "auto"
    reason: str  # one line: why


def resolve(mode: str | None, device: torch.device, dtype: torch.dtype) -> Decision:
    """The mode to apply: ``mode``, else env ``LDM_ACCEL``, else ``auto`` (for inference)."""
    requested = mode if mode is not None else os.environ.get(ENV_VAR) or "auto"
    if requested not in MODES:
        raise LdmError(f"unknown accelerator {requested!r}; choose one of {', '.join(MODES)}")
    device = torch.device(device)
    if requested == "auto":
        return _auto(device, dtype)
    if requested in ("ldm-cpu", "openvino") and device.type != "cpu":
        return Decision("off", f"{requested}: CPU only; {device.type} gets the stock modules")
    return Decision(requested, f"{requested}: requested")


def _auto(device: torch.device, dtype: torch.dtype) -> Decision:
    """The measured rule (docs/benchmarks.md, "Accelerators"): CPU -> ldm-cpu, else off.

    OpenVINO's forward is faster on the CPU, but it converts once per input shape (tens of
    seconds, more than a typical run saves), keeps a second copy of the weights, and its last
    bits differ from torch's, so a seed's image would depend on what happens to be cached.
    """
    if device.type != "cpu":
        return Decision("off", f"auto: {device.type} -> off (stock modules)")
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
    return Decision(
        "ldm-cpu",
        f"auto: CPU {name} -> ldm-cpu (openvino is faster per step but converts per shape and "
        "holds a second copy of the weights: --accel openvino; docs/benchmarks.md)",
    )


def apply(
    module: torch.nn.Module,
    mode: str | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    training: bool = False,
    cache_dir: Path | None = None,
) -> Decision:
    """Speed ``module`` up in place for ``device``/``dtype``; ``state_dict()`` is unchanged.

    ``training``: the module will be differentiated (OpenVINO, inference only, is refused).
    ``cache_dir``: where OpenVINO keeps converted models (default ~/.cache/ldm/openvino).
    """
    decision = resolve(mode, device, dtype)
    if decision.mode == "openvino":
        if training:
            raise LdmError("openvino is inference only; for training use --accel ldm-cpu or off")
        if not openvino.available():
            raise LdmError("openvino is not installed: pip install 'ldm[openvino]'")
        openvino.apply_openvino(module, dtype, cache_dir)
    elif decision.mode == "ldm-cpu":
        apply_ldm_cpu(module, training)
    elif decision.mode == "inductor":
        module.compile()  # module.__call__ runs the compiled forward; parameters are shared
    return decision
