"""The SD3 / SD3.5 latent transformer, MMDiT (Esser et al. 2024, "Scaling Rectified Flow
Transformers", Sec. 4 and Fig. 2).

Latent patches and text tokens go through joint transformer blocks conditioned on the timestep
and the pooled text (adaLN-Zero); a final adaptive norm and a linear layer turn the image tokens
back into patches. The network predicts the flow velocity; it knows nothing of sigmas (the flow
Denoiser maps sigma to its timestep, sigma * 1000). Parameter names follow diffusers'
``SD3Transformer2DModel`` so its state dicts load with strict=True both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import ConfigError
from ldm.models.config_io import DiffusersConfig
from ldm.models.layers import maybe_checkpoint
from ldm.models.mmdit_blocks import (
    AdaLayerNormContinuous,
    CombinedTimestepTextProjEmbeddings,
    JointTransformerBlock,
    PatchEmbed,
)

_QK_NORMS = (None, "rms_norm")  # SD3: None; SD3.5: "rms_norm"


@dataclass
class SD3Config(DiffusersConfig):
    """Architecture of the MMDiT; field names and defaults are diffusers' ``config.json`` keys
    (defaults: SD3-medium's width and depth are 24 x 64 and 24; diffusers' class defaults are
    kept here so a config.json that omits a field means what it means to diffusers)."""

    class_name = "SD3Transformer2DModel"
    where = "transformer config"

    sample_size: int = 128  # training latent side: the position table's unit (base size)
    patch_size: int = 2  # latent pixels per token side
    in_channels: int = 16  # latent channels (SD3's VAE)
    num_layers: int = 18  # joint transformer blocks
    attention_head_dim: int = 64  # channels per head
    num_attention_heads: int = 18  # width = heads x head dim
    joint_attention_dim: int = 4096  # width of the text context (T5-XXL / padded CLIP)
    caption_projection_dim: int = 1152  # context_embedder's output: must equal the width
    pooled_projection_dim: int = 2048  # CLIP-L + CLIP-G pooled, concatenated
    out_channels: int | None = 16  # None: in_channels
    pos_embed_max_size: int | None = 96  # side of the position table, in patches (cropped)
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5: blocks with a 2nd image attention
    qk_norm: str | None = None  # SD3.5: "rms_norm"

    def __post_init__(self) -> None:
        self.dual_attention_layers = tuple(self.dual_attention_layers)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        self.validate()

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def validate(self) -> None:
        """Raise ConfigError naming the first field this implementation cannot honour."""
        if self.qk_norm not in _QK_NORMS:
            raise ConfigError(f"transformer config: qk_norm={self.qk_norm!r} is not supported "
                              f"(supported: None, 'rms_norm')")  # fmt: skip
        if self.pos_embed_max_size is None:
            raise ConfigError("transformer config: pos_embed_max_size=None (interpolated "
                              "positions) is not supported")  # fmt: skip
        if self.caption_projection_dim != self.width:
            raise ConfigError(
                f"transformer config: caption_projection_dim {self.caption_projection_dim} must "
                f"equal num_attention_heads x attention_head_dim ({self.width})"
            )
        if self.width % 4:  # the 2-D sin-cos table splits the width in four
            raise ConfigError(f"transformer config: width {self.width} is not a multiple of 4")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"transformer config: dual_attention_layers {bad} out of range")


class SD3Transformer2DModel(nn.Module):
    """Velocity-predicting MMDiT: (latents, timestep, text tokens, pooled text) -> (B, C, H, W)."""

    def __init__(self, config: SD3Config):
        super().__init__()
        config.validate()
        self.config = c = config
        dim, n = c.width, c.num_layers
        self.pos_embed = PatchEmbed(
            c.sample_size, c.patch_size, c.in_channels, dim, c.pos_embed_max_size
        )
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, c.pooled_projection_dim)
        self.context_embedder = nn.Linear(c.joint_attention_dim, c.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(
                dim,
                c.num_attention_heads,
                c.attention_head_dim,
                context_pre_only=i == n - 1,
                qk_norm=c.qk_norm == "rms_norm",
                dual=i in c.dual_attention_layers,
            )
            for i in range(n)
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
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        skip_layers: list[int] | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, C, H, W) latents, timestep scalar or (B,) (SD3: sigma * 1000),
        encoder_hidden_states (B, S, joint_attention_dim), pooled_projections (B, pooled dim);
        ``skip_layers``: block indices to leave out (SD3.5's skip-layer guidance)."""
        if encoder_hidden_states is None or pooled_projections is None:
            raise ValueError(
                "the SD3 transformer needs encoder_hidden_states and pooled_projections"
            )
        c, b = self.config, hidden_states.shape[0]
        p = c.patch_size
        height, width = hidden_states.shape[-2:]
        t = torch.as_tensor(timestep, device=hidden_states.device)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t

        x = self.pos_embed(hidden_states)  # (B, H/p * W/p, D)
        y = self.time_text_embed(t, pooled_projections)  # (B, D) conditioning vector
        context = self.context_embedder(encoder_hidden_states)  # (B, S, D)
        skip = set(skip_layers or ())
        for i, block in enumerate(self.transformer_blocks):
            if i in skip:
                continue
            context, x = maybe_checkpoint(self.gradient_checkpointing, block, x, context, y)
        x = self.proj_out(self.norm_out(x, F.silu(y)))  # (B, h*w, p*p*C_out)

        # unpatchify: (B, h*w, p*p*C) -> (B, h, w, p, p, C) -> (B, C, h, p, w, p) -> (B, C, H, W)
        h, w = height // p, width // p
        x = x.reshape(b, h, w, p, p, c.out_channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c.out_channels, h * p, w * p)
