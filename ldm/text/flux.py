"""FLUX.1's text conditioning: T5-XXL's hidden states as the context, CLIP-L's pooled output.

As diffusers' ``FluxPipeline.encode_prompt`` (Black Forest Labs 2024): context = T5's
``max_sequence_length`` states (512 for FLUX.1-dev, 256 for schnell), T5 run unmasked, attending
to its padding, and the transformer attends to every token; pooled = CLIP ViT-L's
``pooler_output`` (768, the final LayerNorm at the end-of-text token, not projected). CLIP's
token states are not used.

It is SD3's text path (``ldm.text.sd3``) with the CLIP block left out of the context, so it
shares that class's routes: ``encode`` is diffusers exactly (CLIP truncated at 77 tokens, T5 at
max_sequence_length); ``encode_prompts`` reads A1111 syntax, T5 getting the text without markup
and its states the emphasis weights (as ComfyUI weights FLUX's T5), CLIP's pooled vector coming
from the first 75-token window. A plain prompt gives ``encode``'s result.
"""

from __future__ import annotations

import torch

from ldm.errors import LdmError
from ldm.text.cond import Cond
from ldm.text.sd3 import SD3TextEncoder


class FluxTextEncoder(SD3TextEncoder):
    """The TextEncoder interface for FLUX.1: T5 context, CLIP-L pooled (module docstring).

    ``tokenize``, ``wrap`` and ``chunk_length`` are CLIP's, as for SD3, so A1111 chunk counting
    (``ldm batch``) reads FLUX prompts as it reads the other families'.
    """

    def __init__(self, clip, t5, max_sequence_length: int = 512):
        if t5 is None:  # unlike SD3's, FLUX's context is T5 alone
            raise LdmError("FLUX.1 needs its T5 text encoder (text_encoder_2)")
        # clip: ConcatTextEncoder of CLIP-L alone (pooled = its pooler_output)
        super().__init__(clip, t5, t5.model.config.d_model, max_sequence_length)

    def _join(self, clip: Cond, t5: torch.Tensor | None) -> Cond:
        """(B, max_sequence_length, 4096) T5 states, (B, 768) CLIP pooled; every token attends."""
        mask = torch.ones(t5.shape[:2], dtype=torch.bool, device=t5.device)
        return Cond(t5, clip.pooled.to(t5.dtype), mask)
