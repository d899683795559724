"""Building blocks of the FLUX.1 transformer (Black Forest Labs 2024; the MMDiT of Esser et al.
2024 with rotary positions and parallel single-stream blocks, Dehghani et al. 2023's ViT-22B).

Double-stream blocks keep separate image and text weights and attend jointly (as SD3's joint
block, text tokens first); single-stream blocks run attention and the MLP side by side on the
joined sequence and project both with one linear layer. Every attention normalises q and k per
head (RMS) and rotates them by the 3-axis RoPE of ``ldm.models.rope``. The conditioning vector
embeds the timestep, the pooled CLIP text and (FLUX.1-dev) the distilled guidance scale.
Parameter names are diffusers', so ``FluxTransformer2DModel`` state dicts load with strict=True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.layers import TimestepEmbedding, timestep_embedding
from ldm.models.mmdit_blocks import (
    AdaLayerNormZero,
    FeedForward,
    RMSNorm,
    TextProjection,
    modulate,
)
from ldm.models.rope import apply_rope


class TimestepGuidanceTextEmbedding(nn.Module):
    """The conditioning vector: MLP(sinusoid(t)) [+ MLP(sinusoid(guidance))] + MLP(pooled CLIP)
    (diffusers' CombinedTimestep[Guidance]TextProjEmbeddings); t and guidance come x1000."""

    def __init__(self, dim: int, pooled_projection_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.guidance_embedder = TimestepEmbedding(256, dim) if guidance else None
        self.text_embedder = TextProjection(pooled_projection_dim, dim)

    def _embed(self, mlp: TimestepEmbedding, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return mlp(timestep_embedding(t, 256, flip_sin_to_cos=True, freq_shift=0).to(dtype))

    def forward(
        self, timestep: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """timestep (B,), pooled (B, pooled dim), guidance (B,) or None -> (B, dim)."""
        emb = self._embed(self.timestep_embedder, timestep, pooled.dtype)
        if self.guidance_embedder is not None:
            emb = emb + self._embed(self.guidance_embedder, guidance, pooled.dtype)
        return emb + self.text_embedder(pooled)


class FluxAttention(nn.Module):
    """Multi-head attention with RMS-normalised, rotated q/k. With ``context``: the text tokens'
    own projections (add_*_proj, to_add_out) and joint attention over [text, image]; without an
    output projection (``out=False``): the single-stream block's attention, whose output goes
    into the block's shared proj_out."""

    sdpa = staticmethod(F.scaled_dot_product_attention)  # ldm.accel may give an instance its own

    def __init__(self, dim: int, heads: int, head_dim: int, context: bool, out: bool = True):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)]) if out else None
        self.add_q_proj = self.add_k_proj = self.add_v_proj = self.to_add_out = None
        self.norm_added_q = self.norm_added_k = None
        if context:
            self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (
                nn.Linear(dim, inner) for _ in range(3)
            )
            self.to_add_out = nn.Linear(inner, dim)

    def _split(self, t: torch.Tensor, norm: RMSNorm | None) -> torch.Tensor:
        """(B, L, heads*d) -> (B, heads, L, d), a strided view (normalised per head if asked)."""
        t = t.unflatten(-1, (self.heads, -1))  # (B, L, heads, d)
        return (t if norm is None else norm(t)).transpose(1, 2)

    def _qkv(
        self, x: torch.Tensor, context: torch.Tensor | None, kv_only: int
    ) -> tuple[torch.Tensor, ...]:
        """q, k, v (B, heads, S + L, d) of [text, image] (or of x alone); q/k normalised. The
        first ``kv_only`` tokens of x get no query."""
        q = self._split(self.to_q(x[:, kv_only:]), self.norm_q)
        k = self._split(self.to_k(x), self.norm_k)
        v = self._split(self.to_v(x), None)
        if context is None:
            return q, k, v
        # joined on the token axis of (B, heads, L, d) views: contiguous per head for attention
        q = torch.cat([self._split(self.add_q_proj(context), self.norm_added_q), q], dim=2)
        k = torch.cat([self._split(self.add_k_proj(context), self.norm_added_k), k], dim=2)
        v = torch.cat([self._split(self.add_v_proj(context), None), v], dim=2)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D) image tokens (single stream: text + image)
        rope: torch.Tensor,  # (S + L, d / 2) complex rotations of all tokens, text first
        context: torch.Tensor | None = None,  # (B, S, D) text tokens (double stream)
        kv_only: int = 0,  # single stream: leading tokens that are keys/values only
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (image output (B, L - kv_only, D or heads*d), text output (B, S, D) or None)."""
        q, k, v = self._qkv(x, context, kv_only)
        q, k = apply_rope(q, rope[kv_only:]), apply_rope(k, rope)
        out = self.sdpa(q, k, v)  # (B, heads, queries, d)
        out = out.transpose(1, 2).flatten(2)  # (B, queries, heads*d)
        if context is None:
            return (out if self.to_out is None else self.to_out[0](out)), None
        s = context.shape[1]
        return self.to_out[0](out[:, s:]), self.to_add_out(out[:, :s])


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp16 overflows to inf in the residual stream of the later blocks; diffusers clips it."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class FluxTransformerBlock(nn.Module):
    """Double-stream block: adaLN-Zero-modulated joint attention and MLPs, one set of weights per
    modality (SD3's joint block; every block keeps its text output here)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)  # shift, scale, gate (attention); same (MLP)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(dim, heads, head_dim, context=True)
        # norm2 / norm2_context are parameter-free layer norms (inside ``modulate``)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D) image tokens
        context: torch.Tensor,  # (B, S, D) text tokens
        y: torch.Tensor,  # (B, D) conditioning vector
        rope: torch.Tensor,  # (S + L, head_dim / 2) complex rotations, text first
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (context, x), diffusers' order."""
        silu_y = F.silu(y)
        mod, cmod = self.norm1(silu_y), self.norm1_context(silu_y)
        attn_x, attn_c = self.attn(
            modulate(x, mod[0], mod[1]), rope, modulate(context, cmod[0], cmod[1])
        )
        x = torch.addcmul(x, mod[2][:, None], attn_x)  # gated residual (adaLN-Zero)
        x = torch.addcmul(x, mod[5][:, None], self.ff(modulate(x, mod[3], mod[4])))
        context = torch.addcmul(context, cmod[2][:, None], attn_c)
        ff_c = self.ff_context(modulate(context, cmod[3], cmod[4]))
        return _clip_fp16(torch.addcmul(context, cmod[5][:, None], ff_c)), x


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block on the joined [text, image] tokens: attention and a GELU MLP in
    parallel from one modulated norm, their outputs concatenated through one linear layer,
    gated residual (ViT-22B's parallel layers)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZero(dim, 3)  # shift, scale, gate
        self.proj_mlp = nn.Linear(dim, self.mlp_hidden_dim)
        self.act_mlp = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(heads * head_dim + self.mlp_hidden_dim, dim)
        self.attn = FluxAttention(dim, heads, head_dim, context=False, out=False)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, S + L, D) text then image tokens
        y: torch.Tensor,  # (B, D) conditioning vector
        rope: torch.Tensor,  # (S + L, head_dim / 2) complex rotations
        kv_only: int = 0,  # leading tokens whose output is not wanted (the last block: S)
    ) -> torch.Tensor:
        """-> (B, S + L - kv_only, D): the tokens after the first ``kv_only``, which still serve
        as keys and values (diffusers computes their outputs too and discards them)."""
        shift, scale, gate = self.norm(F.silu(y))
        h = modulate(tokens, shift, scale)
        attn = self.attn(h, rope, kv_only=kv_only)[0]  # (B, S + L - kv_only, heads*d)
        mlp = self.act_mlp(self.proj_mlp(h[:, kv_only:]))  # (.., mlp_hidden_dim)
        out = self.proj_out(torch.cat([attn, mlp], dim=2))
        return _clip_fp16(torch.addcmul(tokens[:, kv_only:], gate[:, None], out))
