"""FLUX.1's packed latents: 2x2 patches of the (B, C, H, W) latent as tokens of 4C channels, the
position ids the transformer's RoPE reads, and ``PackedFlux``, which lets the samplers and the
Denoiser keep working with image-shaped latents (diffusers' FluxPipeline _pack_latents,
_unpack_latents, _prepare_latent_image_ids and prepare_latents' size rounding).
"""

from __future__ import annotations

import torch
from torch import nn

VAE_SCALE_FACTOR = 8  # FLUX.1's VAE: pixels per latent pixel


def latent_size(height: int, width: int, vae_scale_factor: int = VAE_SCALE_FACTOR):
    """The latent (h, w) of an image size, both even: diffusers rounds the pixel size down to a
    multiple of 2 x vae_scale_factor (16 px) so that latents pack into 2x2 patches."""
    return (
        2 * (int(height) // (vae_scale_factor * 2)),
        2 * (int(width) // (vae_scale_factor * 2)),
    )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): row-major 2x2 patches, channels (c, dy, dx)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 patches: latent size {h}x{w} must be even")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W); height, width: the latent's (even) size."""
    b, n, c4 = packed.shape
    h, w = height // 2, width // 2
    if n != h * w or c4 % 4:
        raise ValueError(f"{n} tokens of {c4} channels are no 2x2-packed {height}x{width} latent")
    x = packed.reshape(b, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, 2, w, 2)
    return x.reshape(b, c4 // 4, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h * w, 3) ids (0, row, col) of the packed tokens of an (height, width) latent, row-major
    (h, w = height/2, width/2)."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(S, 3) zeros: every text token sits at position 0 of every axis."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


class PackedFlux(nn.Module):
    """A FLUX transformer as an image-shaped network (no parameters of its own): ``(x (B, C, H,
    W), t, encoder_hidden_states=, pooled_projections=, guidance=) -> (B, C', H, W)``.

    Packs x, builds the ids, calls the transformer and unpacks its output, so the Denoiser and
    the samplers never see tokens. t is the flow sigma in [0, 1] (the transformer x1000s it, as
    diffusers' FluxPipeline passes t / 1000). Extra conditioning channels (Fill: masked latents +
    64 mask channels; Depth/Canny: control latents) come concatenated to x on the channel axis,
    which packs to diffusers' concatenation of packed tensors; C' = out_channels / 4.
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    @property
    def config(self):
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def forward(
        self,
        x: torch.Tensor,  # (B, C, H, W), 4C = in_channels, H and W even
        timestep: torch.Tensor | float,  # scalar or (B,) sigma in [0, 1]
        encoder_hidden_states: torch.Tensor | None = None,  # (B, S, 4096) T5 tokens
        pooled_projections: torch.Tensor | None = None,  # (B, 768) CLIP-L pooled
        guidance: torch.Tensor | float | None = None,  # scalar or (B,) dev's guidance scale
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("FLUX needs encoder_hidden_states (T5 tokens)")
        in_channels = self.transformer.config.in_channels
        if 4 * x.shape[1] != in_channels:
            raise ValueError(
                f"latents of {x.shape[1]} channels pack to {4 * x.shape[1]}, but this FLUX "
                f"transformer takes {in_channels} (concatenate its conditioning channels)"
            )
        height, width = x.shape[-2:]
        ids = dict(
            img_ids=image_ids(height, width, x.device),
            txt_ids=text_ids(encoder_hidden_states.shape[1], x.device),
        )
        out = self.transformer(
            pack_latents(x),
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            guidance=guidance,
            **ids,
        )  # (B, H/2 * W/2, out_channels)
        return unpack_latents(out, height, width)
