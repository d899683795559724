"""SDXL micro-conditioning (Podell et al. 2023, Sec. 2.2): sizes, crop and aesthetic score.

The U-Net sees them as extra "time ids" beside the pooled text (each id embedded like a
timestep); they ride in the ``Cond`` with the text, so classifier-free guidance batches the
positive and negative ids with their prompts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ldm.errors import LdmError
from ldm.text.cond import Cond

Size = tuple[int, int]  # (height, width), in pixels


@dataclass
class MicroConditioning:
    """A request's SDXL conditioning, in diffusers' argument names; None means "as the output".

    Each negative value defaults to its positive one (diffusers uses the negative sizes only
    when both are given); the refiner's negative aesthetic score is diffusers' 2.5.
    """

    original_size: Size | None = None  # None: the output size
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: Size | None = None  # None: the output size
    negative_original_size: Size | None = None  # None: original_size
    negative_crops_coords_top_left: tuple[int, int] | None = None  # None: the positive crop
    negative_target_size: Size | None = None  # None: target_size
    aesthetic_score: float = 6.0  # refiner only
    negative_aesthetic_score: float = 2.5  # refiner only

    def ids(self, kind: str, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive ids, negative ids), each (N,), for an output of height x width."""
        original = tuple(self.original_size or (height, width))
        target = tuple(self.target_size or (height, width))
        crop = tuple(self.crops_coords_top_left)
        positive = time_ids(kind, original, crop, target, self.aesthetic_score)
        negative = time_ids(
            kind,
            tuple(self.negative_original_size or original),
            tuple(self.negative_crops_coords_top_left or crop),
            tuple(self.negative_target_size or target),
            self.negative_aesthetic_score,
        )
        return positive, negative


def time_ids(
    kind: str,  # the family's micro_conditioning: "size" (base) or "aesthetic" (refiner)
    original_size: Size,  # the training image's size before any resize (base default: output)
    crop: tuple[int, int] = (0, 0),  # crops_coords_top_left (top, left) of the training crop
    target_size: Size | None = None,  # the output size ("size" kind only)
    aesthetic_score: float = 6.0,  # LAION aesthetic score ("aesthetic" kind only)
) -> torch.Tensor:
    """(N,) float32 ids in diffusers' order: original + crop + target (6) or + score (5)."""
    if kind == "size":
        if target_size is None:
            raise LdmError("SDXL micro-conditioning needs the target size")
        values = [*original_size, *crop, *target_size]
    elif kind == "aesthetic":
        values = [*original_size, *crop, aesthetic_score]
    else:
        raise LdmError(f"unknown micro-conditioning {kind!r} (expected 'size' or 'aesthetic')")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def with_time_ids(cond: Cond, ids: torch.Tensor) -> Cond:
    """``cond`` with (N,) ids for every row, or (B, N) ids row by row."""
    ids = ids.to(cond.context.device, torch.float32)
    ids = ids.expand(len(cond), -1) if ids.ndim == 1 else ids
    return dataclasses.replace(cond, time_ids=ids)


def zero_rows(cond: Cond, rows: list[bool]) -> Cond:
    """The chosen rows as zero context and zero pooled: SDXL's unconditional input when
    ``force_zeros_for_empty_prompt`` (an empty negative prompt, a dropped training caption)."""
    zero = torch.tensor(rows, dtype=torch.bool, device=cond.context.device)
    if not zero.any():
        return cond
    keep = (~zero).to(cond.context.dtype)  # (B,)
    pooled = None if cond.pooled is None else cond.pooled * keep[:, None].to(cond.pooled.dtype)
    return dataclasses.replace(cond, context=cond.context * keep[:, None, None], pooled=pooled)
