"""Watching a sampler run: step counts for the caller's progress callback, and a guard that
stops at the first non-finite prediction (a black image is worse than an error)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm.dtypes import DTYPE_NAMES
from ldm.errors import LdmError

StepCallback = Callable[[int, int], None]  # callback(step, num_steps) after each sampler step
# preview(step, num_steps, denoised) with the (B, C, h, w) latents the step predicts (live views)
PreviewCallback = Callable[[int, int, torch.Tensor], None]


class Progress:
    """Counts sampler steps for the NaN message and forwards them to the caller's callbacks."""

    def __init__(
        self,
        num_steps: int,
        callback: StepCallback | None,
        preview: PreviewCallback | None = None,
    ):
        self.num_steps, self.callback, self.preview, self.step = num_steps, callback, preview, 0

    def __call__(self, i: int, num_steps: int, x=None, denoised=None) -> None:
        self.step = i + 1
        step = min(self.step, self.num_steps)
        if self.preview is not None and denoised is not None:
            self.preview(step, self.num_steps, denoised)
        if self.callback is not None:
            self.callback(step, self.num_steps)


def nan_guard(denoise, progress: Progress, dtype: torch.dtype):
    """Stop at the first non-finite prediction instead of decoding a black image."""

    def guarded(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        denoised = denoise(x, sigma)
        if not torch.isfinite(denoised).all():
            raise LdmError(
                f"the U-Net produced NaN/Inf at step {progress.step + 1} in "
                f"{DTYPE_NAMES.get(dtype, dtype)}; try --dtype fp32"
            )
        return denoised

    return guarded
