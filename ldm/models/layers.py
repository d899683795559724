"""Building blocks shared by the U-Net and the autoencoder (diffusers' parameter names).

ResNet blocks (He et al. 2016, with the DDPM time-embedding injection of Ho et al. 2020), the
spatial transformer of Rombach et al. 2022 (self-attention, cross-attention, GEGLU feed-forward;
Vaswani et al. 2017, Shazeer 2020), down/up sampling, the sinusoidal timestep embedding and LCM's
guidance-scale embedding.
Every module keeps diffusers' attribute names so a diffusers state dict loads with strict=True.
Plain ``torch.nn`` modules and functional ops only: hardware speed-ups are applied to a loaded model
by ``ldm.accel``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0
) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) (Vaswani et al. 2017, DDPM's t-embed)."""
    half = dim // 2
    # same operation order as diffusers' get_timestep_embedding, so fp32 rounding agrees
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (B,) guidance scales w -> (B, dim) fp32: [sin, cos] of w * 1000 at
    frequencies 10000^(-i / (dim/2 - 1)) (VDM, Kingma et al. 2021; LCM, Luo et al. 2023, eq. 9).
    LCM U-Nets embed w = guidance_scale - 1 (diffusers' LatentConsistencyModelPipeline)."""
    half = dim // 2
    # diffusers' get_guidance_scale_embedding's operation order: arguments reach ~1e4, where a
    # different rounding of the frequencies would move sin/cos by 1e-3
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    args = (w.float() * 1000.0)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 == 1 else emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear_1 -> SiLU -> linear_2 (DDPM); LCM U-Nets add a
    projected condition (the guidance-scale embedding) to the sinusoid first (diffusers' cond_proj).
    """

    def __init__(self, in_channels: int, time_embed_dim: int, cond_proj_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = None
        if cond_proj_dim is not None:
            self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, emb: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:  # (B, cond_proj_dim); None skips it, as in diffusers
            if self.cond_proj is None:
                raise ValueError("a timestep condition given to a U-Net without time_cond_proj_dim")
            emb = emb + self.cond_proj(condition.to(emb.dtype))
        return self.linear_2(self.act(self.linear_1(emb)))


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block GN-SiLU-conv, + time embedding, GN-SiLU-drop-conv (DDPM)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,  # None: no time embedding (the VAE)
        groups: int = 32,
        eps: float = 1e-5,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,  # the sum is divided by this (diffusers' mid blocks)
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = shortcut + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head scaled dot-product attention: tokens (B, L, heads*d) -> (B, Lq, heads*d)."""
    b, lq, inner = q.shape
    d = inner // heads
    # (B, L, heads*d) -> (B, heads, L, d): a strided view, SDPA accepts it without a copy
    q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return out.transpose(1, 2).reshape(b, lq, inner)


class Attention(nn.Module):
    """Attention with to_q/to_k/to_v/to_out (Vaswani et al. 2017); cross when context is given."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,  # None: self-attention
        bias: bool = False,  # q/k/v bias (the VAE's attention has it, the U-Net's does not)
        upcast_attention: bool = False,  # SD 2.x: attend in fp32 when running in fp16/bf16
        dropout: float = 0.0,
        norm_num_groups: int | None = None,  # VAE: GroupNorm + residual inside the block
        eps: float = 1e-6,
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.group_norm = None
        if norm_num_groups is not None:
            self.group_norm = nn.GroupNorm(norm_num_groups, query_dim, eps=eps)
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def attend(
        self, x: torch.Tensor, context: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tokens (B, L, C) attending to context (B, S, D) (itself when None) -> (B, L, C)."""
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if self.upcast_attention and q.dtype in (torch.float16, torch.bfloat16):
            out = attention(q.float(), k.float(), v.float(), self.heads, bias).to(q.dtype)
        else:
            out = attention(q, k, v, self.heads, bias)
        return self.to_out[1](self.to_out[0](out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """VAE mid-block form: GroupNorm, self-attention over pixels, residual (B, C, H, W)."""
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        out = self.attend(tokens).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): proj -> (value, gate), value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP: net = [GEGLU, Dropout, Linear] with 4x inner width."""

    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList(
            [GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the text, GEGLU MLP (LDM, Fig. 3)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int,
        dropout: float = 0.0,
        upcast_attention: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, None, upcast_attention=upcast_attention)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(
            dim, heads, dim_head, cross_attention_dim, upcast_attention=upcast_attention
        )
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn1.attend(self.norm1(x))
        x = x + self.attn2.attend(self.norm2(x), context, bias)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GN, proj_in, transformer blocks on H*W tokens, proj_out, residual."""

    def __init__(
        self,
        heads: int,
        dim_head: int,
        in_channels: int,
        num_layers: int,
        cross_attention_dim: int,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,  # SD 2.x: Linear; SD 1.x: 1x1 Conv2d (same math)
        upcast_attention: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner)
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner, heads, dim_head, cross_attention_dim, dropout, upcast_attention
            )
            for _ in range(num_layers)
        )
        self.gradient_checkpointing = False
        self.use_linear_projection = use_linear_projection

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.use_linear_projection:  # SD 1.x: 1x1 conv on (B, C, H, W)
            tokens = self.proj_in(tokens)
        tokens = tokens.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, H*W, inner)
        if self.use_linear_projection:  # SD 2.x: Linear on the tokens
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = maybe_checkpoint(self.gradient_checkpointing, block, tokens, context, bias)
        if self.use_linear_projection:
            tokens = self.proj_out(tokens)
        out = tokens.view(b, h, w, -1).permute(0, 3, 1, 2)  # (B, C, H, W), NHWC strides
        if not self.use_linear_projection:
            out = self.proj_out(out)
        return out + x


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; padding=0 pads right/bottom by one first (the VAE's variant)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling (or to an explicit size) followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None or tuple(size) == (2 * x.shape[2], 2 * x.shape[3]):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:  # odd latent sizes: match the skip connection's size
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


def maybe_checkpoint(enabled: bool, fn: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
    """Run ``fn(*args)``, recomputing activations in backward when enabled (Chen et al. 2016)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
