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
    guidance: (B,) a guidance scale the network embeds (full LCM U-Nets' w-embedding), or None;
              such a network runs one pass per step, never an unconditioned one.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    guidance: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.context.shape[0]

    def _map(self, fn) -> Cond:
        """A Cond of fn(tensor) for each field that is set (None stays None)."""
        return Cond(*(None if t is None else fn(t) for t in self._fields()))

    def _fields(self) -> tuple:
        return self.context, self.pooled, self.mask, self.time_ids, self.guidance

    def to(self, device=None, dtype=None) -> Cond:
        # masks stay bool, ids and guidance float32 (sizes like 1024 are exact)
        floating = (True, True, False, False, False)
        return Cond(*(
            None if t is None else t.to(device=device, dtype=dtype if f else None)
            for t, f in zip(self._fields(), floating, strict=True)
        ))  # fmt: skip

    def lean(self) -> Cond:
        """Without an all-True token mask: attending everywhere needs none, and SDPA is faster."""
        if self.mask is not None and bool(self.mask.all()):
            return Cond(self.context, self.pooled, None, self.time_ids, self.guidance)
        return self

    def __getitem__(self, index) -> Cond:
        return self._map(lambda t: t[index])

    def repeat(self, n: int) -> Cond:
        """Each row repeated n times in place: [a, b] -> [a, a, b, b] (for n images per prompt)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        """Concatenate along the batch axis; contexts of different lengths are an error.

        Callers that mix prompts of different chunk counts pad them first (see
        ``ldm.text.prompts.pad_to_same_length``).
        """
        lengths = {c.context.shape[1] for c in conds}
        if len(lengths) != 1:
            raise ValueError(f"cannot batch contexts of different lengths {sorted(lengths)}")
        columns = zip(*(c._fields() for c in conds), strict=True)
        return Cond(*(None if any(t is None for t in ts) else torch.cat(ts) for ts in columns))
