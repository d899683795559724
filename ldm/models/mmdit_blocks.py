"""Building blocks of the MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers", Fig. 2).

Patch embedding with a cropped 2-D sin-cos position table, the timestep + pooled-text
embedding, adaptive layer norms (adaLN-Zero, Peebles & Xie 2023; the continuous one of the final
layer), and the joint transformer block: image and text tokens keep their own weights but
attend together. SD3.5 adds RMS q/k normalisation (Sec. 5.3.2 of the paper) and, in its first
blocks, a second image-only attention ("MMDiT-X"). Parameter names are diffusers', so its
``SD3Transformer2DModel`` state dicts load with strict=True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import LdmError
from ldm.models.layers import TimestepEmbedding, timestep_embedding

_EPS = 1e-6  # every norm of the MMDiT (layer norms, q/k RMS norms)


def sincos_pos_embed_2d(dim: int, grid_size: int, base_size: int) -> torch.Tensor:
    """(grid_size**2, dim) 2-D sin-cos table (ViT/MAE); first half encodes the column, second
    the row. Positions are scaled to ``base_size`` units (diffusers' get_2d_sincos_pos_embed
    with interpolation_scale 1): position i is i / (grid_size / base_size)."""
    pos = torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size)  # float32 as ref
    half = dim // 2
    omega = torch.arange(half // 2, dtype=torch.float64) / (half / 2.0)
    omega = 1.0 / 10000**omega  # (half/2,) frequencies, computed in float64 as diffusers does
    angles = torch.outer(pos.double(), omega)  # (G, half/2)
    # rounded to float32 before the G x G expansion (SD3.5: 0.9 GB, not 1.8 GB in float64)
    emb_1d = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()  # (G, half)
    cols = emb_1d[None, :, :].expand(grid_size, -1, -1)  # (G rows, G cols, half): by column
    rows = emb_1d[:, None, :].expand(-1, grid_size, -1)  # by row
    return torch.cat([cols, rows], dim=-1).reshape(grid_size * grid_size, dim)


class PatchEmbed(nn.Module):
    """p x p patches -> tokens, plus the centre crop of a max_size x max_size position table."""

    def __init__(
        self, sample_size: int, patch_size: int, in_channels: int, dim: int, max_size: int
    ):
        super().__init__()
        self.patch_size = patch_size
        self.max_size = max_size  # largest side, in patches, the position table covers
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        table = sincos_pos_embed_2d(dim, max_size, sample_size // patch_size)
        self.register_buffer("pos_embed", table[None], persistent=True)  # (1, max**2, dim)

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """(1, h*w, dim): the centred h x w window of the table (SD3's "cropped" positions)."""
        if h > self.max_size or w > self.max_size:
            raise LdmError(
                f"a latent of {h}x{w} patches is larger than this model's position table "
                f"(pos_embed_max_size {self.max_size}): use a smaller image"
            )
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.view(1, self.max_size, self.max_size, -1)
        return table[:, top : top + h, left : left + w].reshape(1, h * w, -1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/p * W/p, dim), row-major over patches."""
        x = self.proj(latent)  # (B, dim, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, dim), strided view
        return (x + self.cropped_pos_embed(h, w)).to(x.dtype).contiguous()


class TextProjection(nn.Module):
    """Pooled text -> width: linear_1, SiLU, linear_2 (diffusers' PixArtAlphaTextProjection)."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(pooled)))


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """The conditioning vector y: MLP(sinusoid(t), 256 wide) + MLP(pooled text) (paper Fig. 2a)."""

    def __init__(self, dim: int, pooled_projection_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TextProjection(pooled_projection_dim, dim)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(timestep, 256, flip_sin_to_cos=True, freq_shift=0)
        return self.timestep_embedder(emb.to(pooled.dtype)) + self.text_embedder(pooled)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift, per sample: x (B, L, D), shift/scale (B, D)."""
    normed = F.layer_norm(x, x.shape[-1:], eps=_EPS)
    return torch.addcmul(shift[:, None], normed, 1 + scale[:, None])  # one pass over (B, L, D)


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero's modulation: linear(SiLU(y)) -> ``chunks`` (B, D) vectors (shift, scale, gate,
    ...); 6 for a joint block, 9 for SD3.5's dual-attention blocks (SD35AdaLayerNormZeroX)."""

    def __init__(self, dim: int, chunks: int = 6):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, silu_y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(silu_y).chunk(self.chunks, dim=1)


class AdaLayerNormContinuous(nn.Module):
    """LayerNorm(x) * (1 + scale) + shift with (scale, shift) = linear(SiLU(y)) (note: scale
    first, unlike adaLN-Zero): the final layer and the last block's text side."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, silu_y: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(silu_y.to(x.dtype)).chunk(2, dim=1)
        return modulate(x, shift, scale)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (Zhang & Sennrich 2019), on each head's q/k."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the mean square accumulated in fp32 whatever x's dtype (as diffusers), without an fp32
        # copy of x: a bf16 x costs two passes instead of five
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        inv_rms = torch.rsqrt(norm.square() / x.shape[-1] + _EPS).to(x.dtype)  # (..., 1), small
        return x * inv_rms * self.weight


class FeedForward(nn.Module):
    """MLP with 4x width and tanh-approximated GELU: net = [GELU(proj), Dropout, Linear]."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList(
            [_GELU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))  # net[1] is a zero dropout, kept for the names


class _GELU(nn.Module):
    """diffusers' GELU: a product and its activation (a module, so that ``ldm.accel`` can fuse
    the two; it holds no parameters)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(x))


class JointAttention(nn.Module):
    """Multi-head attention over [image tokens, text tokens], each side with its own q/k/v and
    output projections (paper Fig. 2b); without a text side, plain self-attention (SD3.5's attn2).
    ``qk_norm``: RMS-normalise each head's queries and keys (SD3.5, paper Sec. 5.3.2)."""

    sdpa = staticmethod(F.scaled_dot_product_attention)  # ldm.accel may give an instance its own

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        qk_norm: bool = False,
        context: bool = True,  # the text side's projections (add_*_proj)
        context_out: bool = True,  # its output projection (absent in the last block)
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.norm_q = RMSNorm(head_dim) if qk_norm else None
        self.norm_k = RMSNorm(head_dim) if qk_norm else None
        self.add_q_proj = self.add_k_proj = self.add_v_proj = self.to_add_out = None
        self.norm_added_q = self.norm_added_k = None
        if context:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (
                nn.Linear(dim, inner) for _ in range(3)
            )
            self.to_add_out = nn.Linear(inner, dim) if context_out else None
            self.norm_added_q = RMSNorm(head_dim) if qk_norm else None
            self.norm_added_k = RMSNorm(head_dim) if qk_norm else None

    def _split(self, t: torch.Tensor, norm: RMSNorm | None) -> torch.Tensor:
        """(B, L, heads*d) -> (B, heads, L, d), a strided view (normalised per head if asked)."""
        t = t.unflatten(-1, (self.heads, -1))  # (B, L, heads, d)
        return (t if norm is None else norm(t)).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, L, D), context (B, S, D) -> (x's output (B, L, D), context's (B, S, D) or None)."""
        q = self._split(self.to_q(x), self.norm_q)
        k = self._split(self.to_k(x), self.norm_k)
        v = self._split(self.to_v(x), None)
        if context is not None:
            # joined on the token axis of (B, heads, L, d) views: the copy comes out contiguous
            # per head, which CPU attention reads ~8% faster than the strided views
            k = torch.cat([k, self._split(self.add_k_proj(context), self.norm_added_k)], dim=2)
            v = torch.cat([v, self._split(self.add_v_proj(context), None)], dim=2)
            if self.to_add_out is not None:  # the last block discards the text side's output:
                # its queries are not computed (diffusers computes and drops them; same result)
                cq = self._split(self.add_q_proj(context), self.norm_added_q)
                q = torch.cat([q, cq], dim=2)
        out = self.sdpa(q, k, v)  # (B, heads, L (+ S), d)
        n = x.shape[1]
        x_out = self.to_out[0](out[:, :, :n].transpose(1, 2).flatten(2))  # (B, L, heads*d)
        if context is None or self.to_add_out is None:
            return x_out, None
        return x_out, self.to_add_out(out[:, :, n:].transpose(1, 2).flatten(2))


class JointTransformerBlock(nn.Module):
    """MMDiT block (paper Fig. 2b): adaLN-Zero-modulated joint attention and MLPs, one stream of
    weights per modality. ``context_pre_only`` (the last block): the text tokens serve as keys and
    values only, and the block returns no text stream. ``dual``: SD3.5's second, image-only
    attention on a second modulation of the same normalised tokens."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_pre_only: bool = False,
        qk_norm: bool = False,
        dual: bool = False,
    ):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.use_dual_attention = dual
        self.norm1 = AdaLayerNormZero(dim, 9 if dual else 6)
        self.norm1_context = (
            AdaLayerNormContinuous(dim) if context_pre_only else AdaLayerNormZero(dim)
        )
        self.attn = JointAttention(dim, heads, head_dim, qk_norm, context_out=not context_pre_only)
        self.attn2 = JointAttention(dim, heads, head_dim, qk_norm, context=False) if dual else None
        # norm2 / norm2_context are parameter-free layer norms (inside ``modulate``)
        self.ff = FeedForward(dim)
        self.ff_context = None if context_pre_only else FeedForward(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """x (B, L, D) image tokens, context (B, S, D) text tokens, y (B, D) conditioning ->
        (context or None, x), diffusers' order."""
        silu_y = F.silu(y)
        mod = self.norm1(silu_y)  # shift, scale, gate (attention), same (MLP)[, same (attn2)]
        normed = F.layer_norm(x, x.shape[-1:], eps=_EPS)
        h = torch.addcmul(mod[0][:, None], normed, 1 + mod[1][:, None])
        if self.context_pre_only:
            c = self.norm1_context(context, silu_y)
        else:
            cmod = self.norm1_context(silu_y)
            c = modulate(context, cmod[0], cmod[1])
        attn_x, attn_c = self.attn(h, c)
        x = torch.addcmul(x, mod[2][:, None], attn_x)  # gated residual (adaLN-Zero)
        if self.attn2 is not None:  # MMDiT-X: shift, scale, gate = mod[6:9]
            h2 = torch.addcmul(mod[6][:, None], normed, 1 + mod[7][:, None])
            x = torch.addcmul(x, mod[8][:, None], self.attn2(h2)[0])
        x = torch.addcmul(x, mod[5][:, None], self.ff(modulate(x, mod[3], mod[4])))
        if self.context_pre_only:
            return None, x
        context = torch.addcmul(context, cmod[2][:, None], attn_c)
        ff_c = self.ff_context(modulate(context, cmod[3], cmod[4]))
        return torch.addcmul(context, cmod[5][:, None], ff_c), x
