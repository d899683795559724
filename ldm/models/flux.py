"""The FLUX.1 latent transformer (Black Forest Labs 2024; diffusers' ``FluxTransformer2DModel``).

Packed latent tokens (2x2 patches of the 16-channel latent, 64 channels; ``flux_packing``) and
T5 tokens go through double-stream blocks (separate weights, joint attention) and then
single-stream blocks on the joined sequence, all conditioned on one vector (timestep, pooled CLIP
text and, for FLUX.1-dev, the distilled guidance scale) and positioned by a 3-axis RoPE over
(text/image, row, column) ids. A final adaptive norm and linear layer give the flow velocity per
packed token. Timesteps come as diffusers' pipeline passes them (sigma in [0, 1]) and are x1000
inside, as is the guidance scale. Parameter names follow diffusers', so its state dicts load
with strict=True both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import ConfigError
from ldm.models.config_io import DiffusersConfig
from ldm.models.flux_blocks import (
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    TimestepGuidanceTextEmbedding,
)
from ldm.models.layers import maybe_checkpoint
from ldm.models.mmdit_blocks import AdaLayerNormContinuous
from ldm.models.rope import rope_table

ROPE_THETA = 10000.0  # FLUX.1's rotary base (diffusers' FluxPosEmbed(theta=10000))


@dataclass
class FluxConfig(DiffusersConfig):
    """Architecture of the FLUX.1 transformer; field names and defaults are diffusers'
    ``config.json`` keys and class defaults (FLUX.1-dev/schnell: 19 + 38 blocks, 24 x 128)."""

    class_name = "FluxTransformer2DModel"
    where = "transformer config"

    patch_size: int = 1  # tokens are already 2x2-packed latents: only 1 is supported
    in_channels: int = 64  # packed channels (16 x 4); Fill 384, Depth/Canny 128 (caller concats)
    out_channels: int | None = None  # None: in_channels (Fill/Depth: 64)
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38  # single-stream blocks
    attention_head_dim: int = 128  # channels per head: sum(axes_dims_rope)
    num_attention_heads: int = 24  # width = heads x head dim
    joint_attention_dim: int = 4096  # width of the text tokens (T5-XXL)
    pooled_projection_dim: int = 768  # CLIP-L pooled output
    guidance_embeds: bool = False  # FLUX.1-dev: embeds the distilled guidance scale
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # RoPE channels per id axis

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(self.axes_dims_rope)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        self.validate()

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def validate(self) -> None:
        """Raise ConfigError naming the first field this implementation cannot honour."""
        if self.patch_size != 1:
            raise ConfigError(f"transformer config: patch_size={self.patch_size} is not "
                              "supported (FLUX packs 2x2 patches outside the model)")  # fmt: skip
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ConfigError(
                f"transformer config: axes_dims_rope {list(self.axes_dims_rope)} must sum to "
                f"attention_head_dim ({self.attention_head_dim})"
            )
        if any(d <= 0 or d % 2 for d in self.axes_dims_rope):
            raise ConfigError(f"transformer config: axes_dims_rope {list(self.axes_dims_rope)} "
                              "must be positive and even (RoPE rotates channel pairs)")  # fmt: skip
        if self.out_channels % 4:
            raise ConfigError(f"transformer config: out_channels {self.out_channels} is not a "
                              "multiple of 4 (2x2-packed latent channels)")  # fmt: skip


class FluxTransformer2DModel(nn.Module):
    """Velocity-predicting FLUX.1 transformer: packed tokens (B, L, in_channels) + text tokens,
    pooled text, timestep [, guidance] and position ids -> (B, L, out_channels)."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        dim, heads, head_dim = c.width, c.num_attention_heads, c.attention_head_dim
        self.time_text_embed = TimestepGuidanceTextEmbedding(
            dim, c.pooled_projection_dim, c.guidance_embeds
        )
        self.context_embedder = nn.Linear(c.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(c.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim, heads, head_dim) for _ in range(c.num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim, heads, head_dim) for _ in range(c.num_single_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim)
        self.proj_out = nn.Linear(dim, c.patch_size**2 * c.out_channels)
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward (less memory, ~30% more compute)."""
        self.gradient_checkpointing = enabled

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, L, in_channels) packed latents
        encoder_hidden_states: torch.Tensor | None = None,  # (B, S, joint_attention_dim) T5
        pooled_projections: torch.Tensor | None = None,  # (B, pooled_projection_dim) CLIP
        timestep: torch.Tensor | float | None = None,  # scalar or (B,): sigma in [0, 1]
        img_ids: torch.Tensor | None = None,  # (L, 3) (0, row, col); (B, L, 3): the first
        txt_ids: torch.Tensor | None = None,  # (S, 3) zeros; (B, S, 3): the first
        guidance: torch.Tensor | float | None = None,  # scalar or (B,): dev's guidance scale
    ) -> torch.Tensor:
        """The flow velocity of each packed token, (B, L, out_channels)."""
        self._check_inputs(encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids)
        if (guidance is None) == self.config.guidance_embeds:
            raise ValueError(
                "this FLUX transformer embeds a guidance scale: pass guidance="
                if self.config.guidance_embeds
                else "this FLUX transformer has no guidance embedding (guidance_embeds false)"
            )
        x = self.x_embedder(hidden_states)  # (B, L, D)
        b, dtype = x.shape[0], x.dtype
        # diffusers' convention: rounded to the activations' dtype, then x1000
        t = _per_sample(timestep, b, x.device).to(dtype) * 1000
        g = None if guidance is None else _per_sample(guidance, b, x.device).to(dtype) * 1000
        y = self.time_text_embed(t, pooled_projections, g)  # (B, D) conditioning vector
        context = self.context_embedder(encoder_hidden_states)  # (B, S, D)

        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        ids = torch.cat([txt_ids, img_ids])  # (S + L, 3), text first as in the attention
        rope = rope_table(ids, self.config.axes_dims_rope, ROPE_THETA).to(x.device)

        ckpt = self.gradient_checkpointing
        for block in self.transformer_blocks:
            context, x = maybe_checkpoint(ckpt, block, x, context, y, rope)
        s = context.shape[1]
        tokens = torch.cat([context, x], dim=1)  # (B, S + L, D): joined once for all blocks
        for i, block in enumerate(self.single_transformer_blocks):
            # the last block's text outputs would be discarded: its text tokens are keys and
            # values only (diffusers computes and drops them; the image tokens are the same)
            kv_only = s if i == len(self.single_transformer_blocks) - 1 else 0
            tokens = maybe_checkpoint(ckpt, block, tokens, y, rope, kv_only)
        x = tokens if self.single_transformer_blocks else x  # (B, L, D) image tokens
        return self.proj_out(self.norm_out(x, F.silu(y)))  # (B, L, out_channels)

    def _check_inputs(self, context, pooled, timestep, img_ids, txt_ids) -> None:
        missing = [
            name
            for name, value in (
                ("encoder_hidden_states", context),
                ("pooled_projections", pooled),
                ("timestep", timestep),
                ("img_ids", img_ids),
                ("txt_ids", txt_ids),
            )
            if value is None
        ]
        if missing:
            raise ValueError(f"the FLUX transformer needs {', '.join(missing)}")


def _per_sample(value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or (B,) value as a (B,) tensor."""
    v = torch.as_tensor(value, device=device).reshape(-1)
    return v.expand(batch) if v.numel() == 1 else v
