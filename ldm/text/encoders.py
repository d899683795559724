"""Text encoders behind one interface: token ids in, a ``Cond`` (context, pooled, mask) out.

Every encoder owns its tokenizer and exposes:
  ``tokenize(texts) -> list[list[int]]``  ids without special tokens, never truncated;
  ``encode(prompts) -> Cond``             plain prompts, ``max_length`` tokens (truncating, as
                                           diffusers does; long or weighted prompts go through
                                           ``ldm.text.prompts.encode_prompts``, which chunks);
  ``encode_ids(input_ids) -> Cond``       one (B, max_length) window of ids, used for chunks;
  ``max_length``, ``bos_token_id`` (None for T5), ``eos_token_id``, ``pad_token_id``.

SD3's CLIP-L + CLIP-G + T5 combination lives in ``ldm.text.sd3``, FLUX.1's CLIP-L pooled + T5
in ``ldm.text.flux`` (both built by ``text_encoder_for``).

CLIP-family encoders return an all-True mask: Stable Diffusion's U-Net was trained attending to
every one of the 77 positions, padding included, so masking them would change its images.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.errors import LdmError
from ldm.text.cond import Cond
from ldm.text.flux import FluxTextEncoder
from ldm.text.sd3 import SD3TextEncoder, check_max_sequence_length


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids without BOS/EOS and without truncation, for a transformers or open_clip tokenizer."""
    if hasattr(tokenizer, "sot_token_id"):  # open_clip SimpleTokenizer
        return [tokenizer.encode(t) for t in texts]
    out = tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)
    return [list(ids) for ids in out["input_ids"]]


class TextEncoder(nn.Module):
    """Shared plumbing: ``encode`` = tokenize, wrap to ``max_length``, ``encode_ids``."""

    tokenizer: object
    max_length: int = 77
    bos_token_id: int | None
    eos_token_id: int
    pad_token_id: int

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return _tokenize(self.tokenizer, texts)

    def wrap(self, tokens: list[int]) -> list[int]:
        """[BOS] + tokens + [EOS] + [PAD]... to exactly ``max_length`` ids (tokens must fit)."""
        head = [] if self.bos_token_id is None else [self.bos_token_id]
        ids = head + list(tokens) + [self.eos_token_id]
        if len(ids) > self.max_length:
            raise ValueError(f"{len(tokens)} tokens do not fit in a {self.max_length}-id window")
        return ids + [self.pad_token_id] * (self.max_length - len(ids))

    @property
    def chunk_length(self) -> int:
        """Prompt tokens per window (75 for CLIP: 77 minus BOS and EOS)."""
        return self.max_length - 1 - (self.bos_token_id is not None)

    def input_ids(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_length) ids, each prompt truncated to ``chunk_length`` tokens like diffusers."""
        n = self.chunk_length
        return torch.tensor([self.wrap(t[:n]) for t in self.tokenize(prompts)], dtype=torch.long)

    def encode(self, prompts: list[str]) -> Cond:
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.encode_ids(self.input_ids(prompts))

    def encode_ids(self, input_ids: torch.Tensor) -> Cond:
        raise NotImplementedError


class CLIPTextEncoder(TextEncoder):
    """OpenAI CLIP text transformer (Radford et al. 2021) via transformers, with clip skip.

    ``clip_skip`` follows A1111: 1 = the last layer's output (``last_hidden_state``), N > 1 = the
    hidden state N layers from the end, passed through ``final_layer_norm``. diffusers counts
    skipped layers instead: A1111 ``clip_skip=N`` equals diffusers ``clip_skip=N-1`` (A1111 2 =
    diffusers 1 = the penultimate layer). The pooled vector is always from the last layer (as SDXL
    uses it); with a ``CLIPTextModelWithProjection`` it is the projected ``text_embeds``.
    ``penultimate`` (SDXL): the context is counted from the penultimate layer and skips the final
    LayerNorm, as diffusers' SDXL pipeline does: ``hidden_states[-(clip_skip + 1)]``.
    """

    def __init__(self, model: nn.Module, tokenizer, clip_skip: int = 1, penultimate: bool = False):
        super().__init__()
        self.model = model  # transformers CLIPTextModel or CLIPTextModelWithProjection
        self.tokenizer = tokenizer  # transformers CLIPTokenizer(Fast) from the same folder
        config = model.config
        most = config.num_hidden_layers - penultimate
        if not 1 <= clip_skip <= most:
            first = "penultimate" if penultimate else "last"
            raise LdmError(f"--clip-skip {clip_skip}: must be between 1 and {most} "
                           f"(1 = the {first} layer, 2 = the one before)")  # fmt: skip
        self.clip_skip, self.penultimate = clip_skip, penultimate
        self.max_length = min(tokenizer.model_max_length, config.max_position_embeddings)
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id

    def _final_layer_norm(self) -> nn.Module:
        # transformers >= 5 flattened CLIPTextModel; the projection model still nests text_model
        inner = getattr(self.model, "text_model", self.model)
        return inner.final_layer_norm

    def encode_ids(self, input_ids: torch.Tensor) -> Cond:
        input_ids = input_ids.to(self.device)
        out = self.model(
            input_ids=input_ids, output_hidden_states=self.clip_skip > 1 or self.penultimate
        )
        if self.penultimate:
            context = out.hidden_states[-(self.clip_skip + 1)]
        elif self.clip_skip == 1:
            context = out.last_hidden_state
        else:
            # hidden_states = (embeddings, layer 1, ..., layer n): -N is N-1 layers before the end
            context = self._final_layer_norm()(out.hidden_states[-self.clip_skip])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        return Cond(context, pooled, mask)


class OpenCLIPTextEncoder(TextEncoder):
    """OpenCLIP text tower (Cherti et al. 2023) as SD 2.x's ``FrozenOpenCLIPEmbedder`` runs it.

    ``layer_idx`` counts blocks skipped from the end: SD 2.x uses 1 ("penultimate"), 0 is the
    last block. The chosen block's output goes through ``ln_final`` when ``final_norm`` (SD 2.x;
    SDXL's second encoder uses the penultimate block without it). Pooled = the last block's
    ``ln_final`` output at the end-of-text token times ``text_projection`` (open_clip's
    ``encode_text``). ``model`` is an open_clip ``TextTransformer`` or a CLIP model with the text
    attributes at top level (the ``cond_stage_model.model`` of SD 2.x single files).
    """

    def __init__(
        self, model: nn.Module, tokenizer=None, layer_idx: int = 1, final_norm: bool = True
    ):
        super().__init__()
        if tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            tokenizer = SimpleTokenizer()
        self.model = model
        self.tokenizer = tokenizer  # open_clip SimpleTokenizer (ldm's CLIPTokenizer gives same ids)
        num_blocks = len(model.transformer.resblocks)
        if not 0 <= layer_idx < num_blocks:
            raise LdmError(f"OpenCLIP layer_idx {layer_idx}: must be in 0..{num_blocks - 1}")
        self.layer_idx = layer_idx
        self.final_norm = final_norm
        self.max_length = model.positional_embedding.shape[0]
        if hasattr(tokenizer, "sot_token_id"):
            self.bos_token_id, self.eos_token_id = tokenizer.sot_token_id, tokenizer.eot_token_id
        else:
            self.bos_token_id, self.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad_token_id = 0  # open_clip pads with 0, not EOT (it changes the padded positions)

    def encode_ids(self, input_ids: torch.Tensor) -> Cond:
        m = self.model
        input_ids = input_ids.to(self.device)
        x = m.token_embedding(input_ids) + m.positional_embedding[: input_ids.shape[1]]
        batch_first = getattr(m.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)  # (B, L, D) -> (L, B, D)
        attn_mask = m.attn_mask
        if attn_mask is not None:
            attn_mask = attn_mask[: input_ids.shape[1], : input_ids.shape[1]]
        blocks = m.transformer.resblocks
        take = len(blocks) - 1 - self.layer_idx
        for i, block in enumerate(blocks):
            x = block(x, attn_mask=attn_mask)
            if i == take:
                context = x
        if not batch_first:
            x, context = x.transpose(0, 1), context.transpose(0, 1)  # back to (B, L, D)
        if self.final_norm:
            context = m.ln_final(context)
        last = m.ln_final(x)
        pooled = last[torch.arange(len(input_ids), device=x.device), input_ids.argmax(dim=-1)]
        proj = m.text_projection
        if isinstance(proj, nn.Linear):
            pooled = proj(pooled)
        elif proj is not None:
            pooled = pooled @ proj
        mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        return Cond(context, pooled, mask)


class T5TextEncoder(TextEncoder):
    """T5 encoder (Raffel et al. 2020) via transformers; pooled = mean of the real tokens.

    ``attention_mask``: padding is masked (the Cond's mask says which tokens are real); SD3 runs
    T5 unmasked, attending to its padding, as diffusers and ComfyUI do (all-True Cond mask).
    """

    def __init__(
        self, model: nn.Module, tokenizer, max_length: int = 77, attention_mask: bool = True
    ):
        super().__init__()
        self.model = model  # transformers T5EncoderModel
        self.tokenizer = tokenizer  # a transformers tokenizer with eos and pad tokens
        self.max_length = max_length  # ids per sequence, </s> and padding included
        self.attention_mask = attention_mask
        self.bos_token_id = None  # T5 has no start token
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        if self.eos_token_id is None or self.pad_token_id is None:
            raise LdmError("T5 tokenizer: needs both an eos_token and a pad_token")

    def encode_ids(self, input_ids: torch.Tensor) -> Cond:
        input_ids = input_ids.to(self.device)
        real = input_ids != self.pad_token_id  # (B, L)
        if self.attention_mask:  # T5's relative attention then ignores padding
            context = self.model(input_ids=input_ids, attention_mask=real.long()).last_hidden_state
            mask = real
        else:
            context = self.model(input_ids=input_ids).last_hidden_state
            mask = torch.ones_like(real)
        weights = real.unsqueeze(-1).to(context.dtype)  # (B, L, 1)
        pooled = (context * weights).sum(1) / weights.sum(1).clamp(min=1)
        return Cond(context, pooled, mask)


class ConcatTextEncoder(TextEncoder):
    """Several encoders on the same prompt, contexts side by side (SDXL, Podell et al. 2023).

    Context = the encoders' contexts concatenated on the feature axis (768 + 1280 = 2048 for
    SDXL); pooled = the last encoder's (OpenCLIP bigG's projected embedding), or with
    ``pooled="concat"`` all of theirs side by side (SD3: 768 + 1280 = 2048). The encoders share
    CLIP's BPE, so one tokenization serves all; each gets its own padding id after the first
    end-of-text (OpenCLIP pads with 0). ``widths`` lets emphasis weights be applied per encoder,
    as A1111 does (ldm.text.prompts).
    """

    def __init__(self, encoders: list[TextEncoder], pooled: str = "last"):
        super().__init__()
        if pooled not in ("last", "concat"):
            raise ValueError(f"pooled={pooled!r}: expected 'last' or 'concat'")
        self.encoders = nn.ModuleList(encoders)
        self.pooled = pooled
        first = encoders[0]
        self.tokenizer = first.tokenizer
        self.max_length = first.max_length
        self.bos_token_id, self.eos_token_id = first.bos_token_id, first.eos_token_id
        self.pad_token_id = first.pad_token_id
        self.widths: list[int] = []  # context width of each encoder, set by encode_ids

    def encode_ids(self, input_ids: torch.Tensor) -> Cond:
        input_ids = input_ids.to(self.device)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        first_eos = (input_ids == self.eos_token_id).int().argmax(dim=1, keepdim=True)  # (B, 1)
        padding = positions[None, :] > first_eos  # (B, L)
        outs = [e.encode_ids(input_ids.masked_fill(padding, e.pad_token_id)) for e in self.encoders]
        self.widths = [o.context.shape[-1] for o in outs]
        context = torch.cat([o.context for o in outs], dim=-1)  # (B, L, sum of widths)
        mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        pooled = outs[-1].pooled
        if self.pooled == "concat":
            pooled = torch.cat([o.pooled for o in outs], dim=-1)  # (B, sum of pooled widths)
        return Cond(context, pooled, mask)


def _clip_encoder(spec, model, tokenizer, clip_skip: int) -> CLIPTextEncoder:
    """CLIP and OpenCLIP in transformers' CLIP layout."""
    return CLIPTextEncoder(model, tokenizer, clip_skip, penultimate=spec.hidden == "penultimate")


def sequence_length(parts) -> int:
    """T5 tokens of the model's context: its stored default (a model trained with a shorter
    T5 block of zeros) or its family's (SD3 256, FLUX.1-dev 512)."""
    return parts.defaults.get("max_sequence_length", parts.family.max_sequence_length)


def text_encoder_for(
    parts, clip_skip: int = 1, max_sequence_length: int = 256
) -> TextEncoder | SD3TextEncoder | FluxTextEncoder:
    """The family's text encoder(s) of a ``ModelParts``, behind the one TextEncoder interface.

    ``max_sequence_length``: T5 tokens of an SD3 or FLUX context (others ignore it).
    """
    modules = parts.text_modules()
    if parts.family.text_combine == "sd3":
        return _sd3_encoder(parts, modules, clip_skip, max_sequence_length)
    if parts.family.text_combine == "flux":
        return _flux_encoder(modules, clip_skip, max_sequence_length)
    encoders = []
    for spec, model, tokenizer in modules:
        if spec.kind == "t5":
            encoders.append(T5TextEncoder(model, tokenizer))
        else:
            encoders.append(_clip_encoder(spec, model, tokenizer, clip_skip))
    if parts.family.text_combine == "single":
        return encoders[0]
    return ConcatTextEncoder(encoders)


def _sd3_encoder(parts, modules, clip_skip: int, max_sequence_length: int) -> SD3TextEncoder:
    """CLIP-L + CLIP-G (penultimate, pooled side by side) and T5 when the folder has it."""
    check_max_sequence_length(max_sequence_length)
    clips = [_clip_encoder(*m, clip_skip) for m in modules if m[0].kind != "t5"]
    t5 = [(model, tok) for spec, model, tok in modules if spec.kind == "t5" and model is not None]
    if t5:  # diffusers calls T5 without an attention mask (its padding is attended to)
        t5 = T5TextEncoder(*t5[0], max_length=max_sequence_length, attention_mask=False)
        width = t5.model.config.d_model
    else:  # no T5 (--no-t5, or absent from the folder): zeros as wide as the network's text input
        t5, width = None, _joint_attention_dim(parts.unet)
    return SD3TextEncoder(ConcatTextEncoder(clips, pooled="concat"), t5, width, max_sequence_length)


def _flux_encoder(modules, clip_skip: int, max_sequence_length: int) -> FluxTextEncoder:
    """CLIP-L for its pooled output, T5 unmasked for the context (diffusers' FluxPipeline)."""
    check_max_sequence_length(max_sequence_length)
    (clip_spec, clip, clip_tokenizer), (_, t5, t5_tokenizer) = modules
    clip = ConcatTextEncoder([_clip_encoder(clip_spec, clip, clip_tokenizer, clip_skip)])
    if t5 is not None:  # (a single file loaded without T5: FluxTextEncoder says it needs one)
        t5 = T5TextEncoder(t5, t5_tokenizer, max_length=max_sequence_length, attention_mask=False)
    return FluxTextEncoder(clip, t5, max_sequence_length)


def _joint_attention_dim(network) -> int:
    """The transformer's text width (diffusers' ``joint_attention_dim``; SD3: T5-XXL's 4096)."""
    config = getattr(network, "config", None)
    value = config.get("joint_attention_dim") if isinstance(config, dict) else None
    value = value or getattr(config, "joint_attention_dim", None)
    return int(value or 4096)
