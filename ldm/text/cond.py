"""The conditioning record passed from text encoders to the network."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Cond:
    """Text conditioning for a batch.

    context: (B, L, D) token embeddings, the cross-attention keys/values.
    pooled:  (B, P) pooled text embedding, or None (used by SDXL-style added conditioning).
    mask:    (B, L) bool, True for real tokens, or None (all tokens attend).
    time_ids: (B, N) SDXL micro-conditioning (sizes, crop, aesthetic; ldm.text.micro), or None.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.context.shape[0]

    def to(self, device=None, dtype=None) -> Cond:
        def move(t, floating=True):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if floating else None)

        return Cond(
            move(self.context), move(self.pooled), move(self.mask, floating=False),
            move(self.time_ids, floating=False),  # ids stay float32: sizes like 1024 are exact
        )  # fmt: skip

    def lean(self) -> Cond:
        """Without an all-True token mask: attending everywhere needs none, and SDPA is faster."""
        if self.mask is not None and bool(self.mask.all()):
            return Cond(self.context, self.pooled, None, self.time_ids)
        return self

    def __getitem__(self, index) -> Cond:
        def pick(t):
            return None if t is None else t[index]

        return Cond(self.context[index], pick(self.pooled), pick(self.mask), pick(self.time_ids))

    def repeat(self, n: int) -> Cond:
        """Each row repeated n times in place: [a, b] -> [a, a, b, b] (for n images per prompt)."""

        def rep(t):
            return None if t is None else t.repeat_interleave(n, dim=0)

        return Cond(rep(self.context), rep(self.pooled), rep(self.mask), rep(self.time_ids))

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        """Concatenate along the batch axis; contexts of different lengths are an error.

        Callers that mix prompts of different chunk counts pad them first (see
        ``ldm.text.prompts.pad_to_same_length``).
        """
        lengths = {c.context.shape[1] for c in conds}
        if len(lengths) != 1:
            raise ValueError(f"cannot batch contexts of different lengths {sorted(lengths)}")

        def cat(ts):
            return None if any(t is None for t in ts) else torch.cat(ts)

        return Cond(
            torch.cat([c.context for c in conds]),
            cat([c.pooled for c in conds]),
            cat([c.mask for c in conds]),
            cat([c.time_ids for c in conds]),
        )
