"""Latent U-Net with cross-attention to the text (Rombach et al. 2022, "LDM", Sec. 3.3).

Parameter names follow diffusers' ``UNet2DConditionModel`` (state dicts load strictly both ways).
Covers SD 1.x (conv proj, fixed head count), SD 2.x (linear proj, per-block head counts, upcast
attention), SDXL (transformer depth per level, "text_time" added conditioning: pooled text +
embedded size/crop ids, Podell et al. 2023 Sec. 2.2) and full LCM U-Nets (a guidance-scale
embedding added to the timestep's, Luo et al. 2023 Sec. 4.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import ConfigError
from ldm.models.config_io import DiffusersConfig
from ldm.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    maybe_checkpoint,
    timestep_embedding,
)

IntOrTuple = int | tuple[int, ...]

# diffusers fields ldm does not implement, with diffusers' defaults (only the default is accepted)
_UNSUPPORTED: dict[str, Any] = {
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def _per_block(value: IntOrTuple, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"unet config: {name} has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n


@dataclass
class UNetConfig(DiffusersConfig):
    """Architecture of the U-Net; field names and defaults are diffusers' ``config.json`` keys."""

    class_name = "UNet2DConditionModel"
    where = "unet config"
    unsupported = _UNSUPPORTED

    sample_size: Any = None  # informational: the training latent size
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False  # map inputs from [0, 1] to [-1, 1] first
    flip_sin_to_cos: bool = True  # timestep embedding as [cos, sin]
    freq_shift: float = 0  # frequency denominator is half_dim - freq_shift
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2  # resnets per down block (up blocks have one more)
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrTuple = 1280  # width of the text context
    transformer_layers_per_block: IntOrTuple = 1
    reverse_transformer_layers_per_block: tuple[int, ...] | None = None  # up blocks, if differ
    attention_head_dim: IntOrTuple = 8  # diffusers' historical name: the number of heads
    use_linear_projection: bool = False  # SD 2.x
    upcast_attention: bool = False  # SD 2.1: attention in fp32 under fp16/bf16
    resnet_time_scale_shift: str = "default"
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    addition_embed_type: str | None = None  # SDXL: "text_time" (pooled text + size ids)
    addition_time_embed_dim: int | None = None  # SDXL: sinusoid width per time id (256)
    projection_class_embeddings_input_dim: int | None = None  # pooled width + ids x 256
    time_cond_proj_dim: int | None = None  # LCM: width of the guidance-scale (w) embedding

    def __post_init__(self) -> None:
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        if isinstance(self.attention_head_dim, list):
            self.attention_head_dim = tuple(self.attention_head_dim)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field this implementation cannot honour."""
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError("unet config: down/up_block_types must have one entry per block")
        for name, allowed in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
            for t in getattr(self, name):
                if t not in allowed:
                    raise ConfigError(f"unet config: {name} entry {t!r} is not supported")
        checks = {
            "mid_block_type": ("UNetMidBlock2DCrossAttn",),
            "act_fn": ("silu",),
            "resnet_time_scale_shift": ("default",),
            "addition_embed_type": (None, "text_time"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unet config: {name}={getattr(self, name)!r} is not supported")
        for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block"):
            _per_block(getattr(self, name), n, name)
        if self.addition_embed_type == "text_time" and not (
            self.addition_time_embed_dim and self.projection_class_embeddings_input_dim
        ):
            raise ConfigError("unet config: text_time needs addition_time_embed_dim and "
                              "projection_class_embeddings_input_dim")  # fmt: skip
        for ch, heads in zip(self.block_out_channels, self.heads()):
            if ch % heads:
                raise ConfigError(f"unet config: attention_head_dim {heads} does not divide {ch}")

    def heads(self) -> tuple[int, ...]:
        """Heads per down block (diffusers reads attention_head_dim as a head count)."""
        return _per_block(
            self.attention_head_dim, len(self.block_out_channels), "attention_head_dim"
        )


@dataclass
class _BlockSpec:
    in_ch: int
    out_ch: int
    prev_ch: int = 0  # up blocks: channels coming from the block below
    layers: int = 1
    cross: bool = False
    heads: int = 8
    depth: int = 1  # transformer blocks per attention
    context_dim: int = 768
    sample: bool = True  # downsample / upsample at the end


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D / DownBlock2D: resnets (each + transformer), then downsample."""

    def __init__(self, s: _BlockSpec, c: UNetConfig, temb_ch: int):
        super().__init__()
        rn = dict(groups=c.norm_num_groups, eps=c.norm_eps, dropout=c.dropout)
        self.resnets = nn.ModuleList(
            ResnetBlock2D(s.in_ch if i == 0 else s.out_ch, s.out_ch, temb_ch, **rn)
            for i in range(s.layers)
        )
        self.attentions = nn.ModuleList(
            _transformer(s, c, s.out_ch) for _ in range(s.layers if s.cross else 0)
        )
        self.downsamplers = None
        if s.sample:
            self.downsamplers = nn.ModuleList([Downsample2D(s.out_ch, c.downsample_padding)])
        self.gradient_checkpointing = False

    def forward(self, h, temb, context, bias) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = maybe_checkpoint(self.gradient_checkpointing, resnet, h, temb)
            if self.attentions:
                h = self.attentions[i](h, context, bias)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D / UpBlock2D: resnets on [h, skip] (each + transformer), upsample."""

    def __init__(self, s: _BlockSpec, c: UNetConfig, temb_ch: int):
        super().__init__()
        rn = dict(groups=c.norm_num_groups, eps=c.norm_eps, dropout=c.dropout)
        resnets = []
        for i in range(s.layers):
            skip_ch = s.in_ch if i == s.layers - 1 else s.out_ch
            res_in = s.prev_ch if i == 0 else s.out_ch
            resnets.append(ResnetBlock2D(res_in + skip_ch, s.out_ch, temb_ch, **rn))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(
            _transformer(s, c, s.out_ch) for _ in range(s.layers if s.cross else 0)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(s.out_ch)]) if s.sample else None
        self.gradient_checkpointing = False

    def forward(self, h, skips, temb, context, bias, size=None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips.pop()], dim=1)  # skip connection (U-Net, Ronneberger 2015)
            h = maybe_checkpoint(self.gradient_checkpointing, resnet, h, temb)
            if self.attentions:
                h = self.attentions[i](h, context, bias)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, size)
        return h


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) pairs."""

    def __init__(self, s: _BlockSpec, c: UNetConfig, temb_ch: int):
        super().__init__()
        rn = dict(groups=c.norm_num_groups, eps=c.norm_eps, dropout=c.dropout)
        rn["output_scale_factor"] = c.mid_block_scale_factor
        ch = s.out_ch
        self.attentions = nn.ModuleList([_transformer(s, c, ch)])
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, temb_ch, **rn) for _ in range(2))
        self.gradient_checkpointing = False

    def forward(self, h, temb, context, bias) -> torch.Tensor:
        h = maybe_checkpoint(self.gradient_checkpointing, self.resnets[0], h, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            h = attn(h, context, bias)
            h = maybe_checkpoint(self.gradient_checkpointing, resnet, h, temb)
        return h


def _transformer(s: _BlockSpec, c: UNetConfig, ch: int) -> Transformer2DModel:
    return Transformer2DModel(
        s.heads,
        ch // s.heads,
        ch,
        s.depth,
        s.context_dim,
        norm_num_groups=c.norm_num_groups,
        use_linear_projection=c.use_linear_projection,
        upcast_attention=c.upcast_attention,
        dropout=c.dropout,
    )


class UNet2DConditionModel(nn.Module):
    """eps/v-predicting U-Net: (noisy latents, timestep, text context) -> (B, C, H, W)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        chs, n = c.block_out_channels, len(c.block_out_channels)
        layers = _per_block(c.layers_per_block, n, "layers_per_block")
        depth = _per_block(c.transformer_layers_per_block, n, "transformer_layers_per_block")
        ctx = _per_block(c.cross_attention_dim, n, "cross_attention_dim")
        heads = c.heads()
        temb_ch = chs[0] * 4

        self.conv_in = nn.Conv2d(
            c.in_channels, chs[0], c.conv_in_kernel, padding=c.conv_in_kernel // 2
        )
        self.time_embedding = TimestepEmbedding(chs[0], temb_ch, c.time_cond_proj_dim)
        if c.addition_embed_type == "text_time":  # add_time_proj is the parameter-free sinusoid
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, temb_ch)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(c.down_block_types):
            spec = _BlockSpec(chs[max(i - 1, 0)], chs[i], layers=layers[i], heads=heads[i])
            spec.cross, spec.depth = kind.startswith("CrossAttn"), depth[i]
            spec.context_dim = ctx[i]
            spec.sample = i < n - 1  # no downsampling after the last block
            self.down_blocks.append(DownBlock(spec, c, temb_ch))

        spec = _BlockSpec(chs[-1], chs[-1], heads=heads[-1], depth=depth[-1], context_dim=ctx[-1])
        self.mid_block = MidBlock(spec, c, temb_ch)

        # up path mirrors the down path; each up block has one resnet more (it eats the skips)
        up_depth = c.reverse_transformer_layers_per_block or tuple(reversed(depth))
        up_depth = _per_block(up_depth, n, "reverse_transformer_layers_per_block")
        rchs, rheads, rlayers, rctx = (tuple(reversed(x)) for x in (chs, heads, layers, ctx))
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(c.up_block_types):
            spec = _BlockSpec(rchs[min(i + 1, n - 1)], rchs[i], prev_ch=rchs[max(i - 1, 0)])
            spec.layers, spec.heads, spec.depth = rlayers[i] + 1, rheads[i], up_depth[i]
            spec.cross, spec.context_dim = kind.startswith("CrossAttn"), rctx[i]
            spec.sample = i < n - 1
            self.up_blocks.append(UpBlock(spec, c, temb_ch))

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, chs[0], eps=c.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(
            chs[0], c.out_channels, c.conv_out_kernel, padding=c.conv_out_kernel // 2
        )

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in backward (less memory, ~30% more compute)."""
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = enabled

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sample (B, C, H, W), timestep scalar or (B,), context (B, L, D), mask (B, L) 1=keep;
        SDXL: added_cond_kwargs {"text_embeds": (B, P) pooled text, "time_ids": (B, N)};
        LCM: timestep_cond (B, time_cond_proj_dim), layers.guidance_scale_embedding(scale - 1)."""
        c = self.config
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb = self.time_embedding(emb.to(sample.dtype), timestep_cond)
        if c.addition_embed_type == "text_time":
            temb = temb + self._text_time(added_cond_kwargs, temb.dtype)
        context = encoder_hidden_states
        bias = None
        if encoder_attention_mask is not None:
            # additive bias as in diffusers: masked tokens get -10000 before the softmax
            bias = (1.0 - encoder_attention_mask.to(sample.dtype)) * -10000.0
            bias = bias[:, None, None, :]  # (B, 1, 1, L): broadcast over heads and queries

        if c.center_input_sample:
            sample = 2 * sample - 1.0
        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context, bias)
            skips.extend(block_skips)
        h = self.mid_block(h, temb, context, bias)
        for block in self.up_blocks:
            block_skips = [skips.pop() for _ in block.resnets][::-1]
            size = skips[-1].shape[2:] if skips and block.upsamplers is not None else None
            h = block(h, block_skips, temb, context, bias, size)
        h = self.conv_out(F.silu(self.conv_norm_out(h)))
        return h.contiguous()  # NCHW, whichever layout the convolutions chose

    def _text_time(self, added: dict[str, torch.Tensor] | None, dtype: torch.dtype):
        """SDXL's added embedding: MLP([pooled text, sinusoid(id) for each time id])."""
        if not added or added.get("text_embeds") is None or added.get("time_ids") is None:
            raise ValueError("an SDXL U-Net needs added_cond_kwargs text_embeds and time_ids")
        text, ids = added["text_embeds"], added["time_ids"]
        c = self.config
        ids_emb = timestep_embedding(
            ids.flatten(), c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift
        )  # (B * N, 256)
        ids_emb = ids_emb.reshape(text.shape[0], -1)  # (B, N * 256)
        return self.add_embedding(torch.cat([text, ids_emb.to(text.dtype)], dim=-1).to(dtype))
