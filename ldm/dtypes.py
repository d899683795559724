"""The names users give dtypes (``--dtype fp16``), in one place."""

from __future__ import annotations

import torch

from ldm.errors import LdmError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def to_dtype(dtype: str | torch.dtype | None, flag: str = "--dtype") -> torch.dtype | None:
    """``"fp16"``/``"bf16"``/``"fp32"`` (or a torch dtype, or None) -> torch dtype (or None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LdmError(f"{flag} {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
