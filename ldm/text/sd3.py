"""SD3's text conditioning: CLIP-L and CLIP-G side by side, then T5-XXL after them (token axis).

As diffusers' ``StableDiffusion3Pipeline.encode_prompt`` (Esser et al. 2024, "Scaling Rectified
Flow Transformers", Fig. 2): context = the penultimate hidden states of CLIP-L and CLIP-G
concatenated on the feature axis (768 + 1280), zero-padded to T5's width (4096), followed by T5's
``max_sequence_length`` (default 256, at most 512) states; pooled = the two CLIPs' projected pooled
outputs side by side (768 + 1280 = 2048). T5 is optional (4.7 B parameters): without it its block
is zeros of the same shape, as diffusers does. T5 runs unmasked, attending to its padding, and the
network attends to every token (all-True mask), as in diffusers and ComfyUI.

Two routes, where diffusers says nothing about prompt syntax:
- ``encode(prompts)``: diffusers exactly; CLIP truncated at 77 tokens, T5 at max_sequence_length.
- ``encode_prompts(prompts)`` (what ``ldm.text.prompts.encode_prompts`` and the pipeline use):
  the CLIP block follows A1111 syntax as for SDXL (emphasis per encoder, 75-token chunks side by
  side, nothing truncated: 77·n tokens, as A1111's and ComfyUI's SD3 encoders chunk CLIP); T5
  reads the same text with the markup removed (``BREAK`` dropped), truncated at
  max_sequence_length, and its states get the same emphasis weights by the same rule (ComfyUI
  weights T5 too; A1111 leaves T5 unweighted). A plain prompt of at most 75 CLIP tokens gives
  exactly ``encode``'s result, so the pipeline equals diffusers there.
Both CLIPs read the same BPE tokens (as in Stability's SD3 code, A1111 and ComfyUI), so a "!"
in a prompt stays a BPE token for CLIP-G; diffusers' CLIP-G tokenizer, whose pad token is "!",
reads it as padding: the one case where ``encode`` differs from diffusers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import LdmError
from ldm.text.cond import Cond
from ldm.text.prompts import BREAK, emphasize, encode_prompts, parse_prompt_attention

MAX_SEQUENCE_LENGTH = 512  # diffusers refuses more T5 tokens (SD3 was trained with at most 512)


def check_max_sequence_length(n) -> int:
    """``max_sequence_length`` as diffusers accepts it (1..512), else a one-line LdmError."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SEQUENCE_LENGTH:
        raise LdmError(
            f"--max-sequence-length {n!r}: T5 takes 1 to {MAX_SEQUENCE_LENGTH} tokens "
            "(SD3's default is 256)"
        )
    return n


class SD3TextEncoder(nn.Module):
    """The TextEncoder interface for SD3 (``ldm.text.encoders``), CLIP windows first, then T5.

    ``tokenize``, ``wrap``, ``chunk_length`` and the token ids are the CLIP block's, so A1111
    chunk counting (``ldm.text.prompts.prompt_chunks``, ``ldm batch``) sees SD3 as it sees SDXL;
    ``encode_ids`` does not exist here, since the T5 block needs the text, not CLIP's ids.
    """

    def __init__(self, clip, t5, width: int, max_sequence_length: int = 256):
        super().__init__()
        self.clip = clip  # ConcatTextEncoder of CLIP-L and CLIP-G, pooled="concat"
        self.t5 = t5  # T5TextEncoder (unmasked, max_length = max_sequence_length) or None
        self.width = width  # T5's width = the transformer's joint_attention_dim (4096)
        self.max_sequence_length = check_max_sequence_length(max_sequence_length)
        if t5 is not None and t5.max_length != max_sequence_length:
            raise ValueError(f"T5 max_length {t5.max_length} != {max_sequence_length}")
        clip_width = sum(e.model.config.hidden_size for e in clip.encoders)
        if clip_width > width:  # diffusers' F.pad would silently crop the CLIP states
            raise LdmError(f"SD3 text encoders: CLIP states {clip_width} wide, T5's only {width}")
        self.tokenizer = clip.tokenizer
        self.max_length = clip.max_length
        self.bos_token_id, self.eos_token_id = clip.bos_token_id, clip.eos_token_id
        self.pad_token_id = clip.pad_token_id

    @property
    def device(self) -> torch.device:
        return self.clip.device

    @property
    def chunk_length(self) -> int:
        return self.clip.chunk_length

    @property
    def widths(self) -> list[int]:
        return self.clip.widths

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.clip.tokenize(texts)

    def wrap(self, tokens: list[int]) -> list[int]:
        return self.clip.wrap(tokens)

    def encode(self, prompts: list[str]) -> Cond:
        """diffusers' ``encode_prompt``: (B, 77 + max_sequence_length, width), pooled (B, 2048)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self._join(self.clip.encode(prompts), self._t5([[(p, 1.0)] for p in prompts]))

    def encode_prompts(self, prompts: list[str], *, min_chunks: int = 1) -> Cond:
        """A1111 syntax (module docstring): (B, 77·chunks + max_sequence_length, width)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        clip = encode_prompts(self.clip, prompts, min_chunks=min_chunks)
        runs = [[r for r in parse_prompt_attention(p) if r != BREAK] for p in prompts]
        return self._join(clip, self._t5(runs))

    def encode_ids(self, input_ids: torch.Tensor) -> Cond:
        raise NotImplementedError("SD3 encodes text (encode, encode_prompts): T5 has its own ids")

    def _t5(self, prompt_runs: list[list[tuple[str, float]]]) -> torch.Tensor | None:
        """(B, max_sequence_length, width) T5 states of (text, weight) runs; None without T5."""
        if self.t5 is None:
            return None
        keep = self.t5.chunk_length  # max_sequence_length - 1: </s> always ends the sequence
        rows, row_weights = [], []
        for runs in prompt_runs:
            texts = [t for t, _ in runs]
            if len(texts) > 1:  # SentencePiece reads a run's edge space as a "▁" token of its own
                texts = [t.strip() for t in texts]  # (each run starts a word: T5 prepends "▁")
            pieces = self.t5.tokenize(texts) if texts else []
            rows.append([i for ids in pieces for i in ids][:keep])
            row_weights.append([w for ids, (_, w) in zip(pieces, runs) for _ in ids][:keep])
        ids = torch.tensor([self.t5.wrap(r) for r in rows], dtype=torch.long)
        context = self.t5.encode_ids(ids).context  # (B, max_sequence_length, width)
        weighted = []
        for row, w in zip(context, row_weights):
            if any(x != 1.0 for x in w):
                token_weights = torch.ones(row.shape[0], device=row.device)  # </s>, padding: 1
                token_weights[: len(w)] = torch.tensor(w)
                row = emphasize(row, token_weights)
            weighted.append(row)
        return torch.stack(weighted)

    def _join(self, clip: Cond, t5: torch.Tensor | None) -> Cond:
        """CLIP block zero-padded to T5's width, then the T5 block (zeros without T5)."""
        context = F.pad(clip.context, (0, self.width - clip.context.shape[-1]))  # (B, 77·n, W)
        if t5 is None:  # diffusers: zeros of (B, max_sequence_length, joint_attention_dim)
            shape = (len(context), self.max_sequence_length, self.width)
            t5 = torch.zeros(shape, dtype=context.dtype, device=context.device)
        context = torch.cat([context, t5.to(context.dtype)], dim=1)  # (B, 77·n + T, W)
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        return Cond(context, clip.pooled, mask)
