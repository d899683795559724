"""Captions and sample sizes -> the network's ``Cond`` for one training micro-batch.

The family's text encoders (``ldm.text.encoders.text_encoder_for``; SDXL's two, contexts
concatenated, pooled from the second) encode the captions, trained or frozen, or their outputs
are read from a ``TextEmbeddingCache`` when frozen. Caption dropout trains the branch that
classifier-free guidance (Ho & Salimans 2022) later calls unconditional, so a dropped row is
exactly what the pipeline's uncond is: the empty prompt encoded, or, for SDXL with
``force_zeros_for_empty_prompt`` (diffusers' default), zero context and zero pooled. SDXL's
micro-conditioning (``ldm.text.micro``) is computed per sample from the data's sizes and crops,
never cached with the text.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm.data.cache import TextEmbeddingCache, module_hash, precompute_text
from ldm.errors import ConfigError
from ldm.text.cond import Cond
from ldm.text.encoders import sequence_length, text_encoder_for
from ldm.text.micro import time_ids, with_time_ids, zero_rows
from ldm.train.batches import Sizes

TEXT_PARTS = ("text_encoder", "text_encoder_2")


class TrainingText:
    """Builds each micro-batch's Cond: text (encoded or cached), dropout, micro-conditioning."""

    def __init__(
        self,
        parts,  # ModelParts: its family says which encoders and which micro-conditioning
        trained: dict[str, nn.Module],  # part name -> module this stage trains
        wrapped: dict[str, nn.Module],  # the same, prepared by accelerate (DDP)
        clip_skip: int = 1,  # as text_encoder_for counts it
        aesthetic_score: float = 6.0,  # refiner ids only
    ):
        self.encoder = text_encoder_for(parts, clip_skip, sequence_length(parts))
        self.clip_skip = clip_skip
        self.grad = any(n in TEXT_PARTS for n in trained)  # gradients through the encoders
        _call_wrapped(self.encoder, trained, wrapped)
        self.micro = getattr(parts.family, "micro_conditioning", None)  # None: no time ids
        default = parts.family.force_zeros_for_empty_prompt  # a folder's model_index may say
        self.zero_dropped = bool(parts.model_index.get("force_zeros_for_empty_prompt", default))
        self.aesthetic_score = aesthetic_score
        self.cache: TextEmbeddingCache | None = None

    def __call__(self, captions: list[str], drop: list[bool], sizes: list[Sizes], device) -> Cond:
        """(B,) captions, dropout flags and sizes -> Cond(context, pooled, time_ids) on device."""
        texts = ["" if d else c for c, d in zip(captions, drop)]
        if self.cache is not None:
            context, pooled = self._cached(texts)
        else:
            with torch.set_grad_enabled(self.grad):
                out = self.encoder.encode(texts)
            context, pooled = out.context, out.pooled
        pooled = None if pooled is None else pooled.to(device)
        cond = Cond(context.to(device), pooled)  # no mask: CLIP U-Nets attend to all 77 tokens
        if self.zero_dropped:  # force_zeros_for_empty_prompt: a dropped caption is all zeros
            cond = zero_rows(cond, drop)
        if self.micro is not None:
            ids = torch.stack([self._time_ids(s) for s in sizes])  # (B, 6) or (B, 5)
            cond = with_time_ids(cond, ids)
        return cond

    def _time_ids(self, sizes: Sizes) -> torch.Tensor:
        original, crop, target = sizes
        return time_ids(self.micro, original, crop, target, self.aesthetic_score)

    def _cached(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = [self.cache.get(t) for t in texts]
        missing = [t for t, r in zip(texts, rows) if r is None]
        if missing:  # precompute covered every caption of the data: the cache was changed
            raise ConfigError(f"text cache: no entry for caption {missing[0]!r} (delete the cache)")
        context = torch.stack([r["context"] for r in rows])  # (B, L, D)
        pooled = torch.stack([r["pooled"] for r in rows]) if "pooled" in rows[0] else None
        return context, pooled

    @torch.no_grad()
    def precompute(self, captions: list[str], directory: Path) -> int:
        """Encode every distinct caption (and the empty prompt) into an on-disk cache; read
        from it from now on. Returns the number of entries written."""
        if self.grad:
            raise ConfigError(
                "data.cache_text: the text encoders train in this stage; caching needs them frozen"
            )
        # the key covers the weights and the layer read, so another model or clip_skip misses
        key = f"{module_hash(self.encoder)}-clip_skip{self.clip_skip}"
        self.cache = TextEmbeddingCache(directory, key)

        def encode(chunk: list[str]) -> dict[str, torch.Tensor]:
            out = self.encoder.encode(chunk)
            return {"context": out.context, "pooled": out.pooled}

        return precompute_text([*captions, ""], self.cache, encode)


def _call_wrapped(encoder: nn.Module, trained: dict, wrapped: dict) -> None:
    """Let the encoder call the accelerate-prepared modules (DDP syncs their gradients only
    through the wrapper's forward); in one process the wrapper is the module itself."""
    swap = {id(trained[n]): wrapped[n] for n in TEXT_PARTS if n in trained}
    for sub in encoder.modules():
        model = getattr(sub, "model", None)
        if model is not None and id(model) in swap and swap[id(model)] is not model:
            sub.model = swap[id(model)]
