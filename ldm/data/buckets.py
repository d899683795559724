"""Aspect-ratio buckets, after kohya-ss/sd-scripts (``make_bucket_resolutions``, ``BucketManager``).

Bucket resolutions have area <= resolution², sides multiples of ``steps`` between ``min_size``
and ``max_size``; an image goes to the bucket whose aspect ratio is closest to its own, is
resized to cover it and cropped. With ``no_upscale`` an image gets its own bucket: its size
rounded down to ``steps`` (after shrinking to the maximum area if it is larger).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ldm.errors import ConfigError


def make_bucket_resolutions(
    resolution: int | tuple[int, int],
    min_size: int = 256,
    max_size: int = 1024,
    steps: int = 64,
) -> list[tuple[int, int]]:
    """Sorted (W, H) buckets: the largest square, then each width in steps with the tallest
    height that keeps the area within the budget (kohya's make_bucket_resolutions)."""
    w0, h0 = (resolution, resolution) if isinstance(resolution, int) else resolution
    max_area = w0 * h0
    side = int(math.sqrt(max_area) // steps) * steps
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, steps):
        height = min(max_size, (max_area // width) // steps * steps)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


@dataclass(frozen=True)
class Placement:
    """Where one image goes: the bucket (W, H) and the size it is resized to before cropping."""

    bucket: tuple[int, int]
    resized: tuple[int, int]


class BucketManager:
    """Assign images to aspect-ratio buckets (kohya's BucketManager.select_bucket)."""

    def __init__(
        self,
        resolution: int | tuple[int, int],
        min_size: int = 256,  # smallest bucket side
        max_size: int = 1024,  # largest bucket side
        steps: int = 64,  # bucket sides are multiples of this (kohya's bucket_reso_steps)
        no_upscale: bool = False,  # small images keep their own size (rounded down to steps)
    ):
        if steps <= 0 or min_size <= 0 or max_size < min_size:
            raise ConfigError(
                f"buckets: need 0 < min_size <= max_size and steps > 0, got "
                f"min_size={min_size} max_size={max_size} steps={steps}"
            )
        w0, h0 = (resolution, resolution) if isinstance(resolution, int) else resolution
        if max(w0, h0) > max_size:
            raise ConfigError(f"buckets: max_size {max_size} is below the resolution {w0}x{h0}")
        self.max_area, self.steps, self.no_upscale = w0 * h0, steps, no_upscale
        self.resolutions = make_bucket_resolutions((w0, h0), min_size, max_size, steps)

    def _round(self, x: float) -> int:
        """Round to the nearest pixel, then down to a multiple of steps."""
        x = int(x + 0.5)
        return x - x % self.steps

    def select(self, width: int, height: int) -> Placement:
        """Bucket and resize target for an image of (width, height)."""
        if self.no_upscale:
            return self._own_bucket(width, height)
        aspect = width / height
        if (width, height) in self.resolutions:
            bucket = (width, height)
        else:
            # ties go to the first (smallest-width) bucket, as numpy's argmin does in kohya
            bucket = min(self.resolutions, key=lambda r: abs(r[0] / r[1] - aspect))
        # scale so the image covers the bucket: match the side that is relatively shorter
        scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
        return Placement(bucket, (int(width * scale + 0.5), int(height * scale + 0.5)))

    def _own_bucket(self, width: int, height: int) -> Placement:
        """no_upscale: shrink to the area budget if larger, then round the sides down to steps."""
        aspect = width / height
        resized = (width, height)
        if width * height > self.max_area:
            target_w = math.sqrt(self.max_area * aspect)
            target_h = self.max_area / target_w
            # two candidates: round the width to steps, or the height; keep the truer aspect
            w_a = self._round(target_w)
            h_a = self._round(w_a / aspect)
            h_b = self._round(target_h)
            w_b = self._round(h_b * aspect)
            err_a = abs(w_a / h_a - aspect) if h_a else math.inf
            err_b = abs(w_b / h_b - aspect) if h_b else math.inf
            if err_a < err_b:
                resized = (w_a, int(w_a / aspect + 0.5))
            else:
                resized = (int(h_b * aspect + 0.5), h_b)
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        return Placement(bucket, resized)
