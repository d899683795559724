"""The pipeline's pixel side: which VAE and dtype turn pixels into latents and back.

Kept apart from the sampling so ``Pipeline`` reads as the data flow: fp16 pipelines of families
whose VAE overflows decode through an fp32 copy (diffusers' ``force_upcast``), and an image that
decodes to NaN/Inf is decoded again in fp32 rather than saved black.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image

from ldm.errors import LdmError


class PixelSide:
    """Mixin of :class:`ldm.pipeline.Pipeline`: needs ``vae``, ``parts``, ``device``, ``dtype``
    and ``_vae_fp32`` (None until the first fp32 copy is made)."""

    # (no attention slicing: on the CPU torch's SDPA already runs attention in blocks)
    def enable_vae_slicing(self) -> None:
        self.vae.enable_slicing()

    def enable_vae_tiling(self) -> None:
        self.vae.enable_tiling()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> tuple[list[Image.Image], list[bool]]:
        """Step 4: latents -> images, each again in fp32 if it came out NaN/Inf (and which did)."""
        vae, where = self._vae_for_pixels()
        pixels = vae.decode(latents.to(where["dtype"])).float()
        retried = [False] * len(pixels)
        for i in range(len(pixels)):
            if not torch.isfinite(pixels[i]).all():
                pixels[i] = self._fp32_vae().decode(latents[i : i + 1].float())[0]
                retried[i] = True
                if not torch.isfinite(pixels[i]).all():
                    raise LdmError(f"image {i} decodes to NaN/Inf even in fp32")
        # as diffusers' postprocess: [-1, 1] -> [0, 1] -> round(x * 255)
        arrays = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        arrays = arrays.permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays], retried

    def _vae_for_pixels(self) -> tuple[torch.nn.Module, dict]:
        """The VAE and dtype to encode/decode with: fp32 under fp16 where the family honours
        the VAE config's ``force_upcast`` (diffusers' SDXL pipelines: its VAE overflows)."""
        family = self.parts.family
        if self.dtype == torch.float16 and family.vae_upcast and self.vae.config.force_upcast:
            return self._fp32_vae(), dict(device=self.device, dtype=torch.float32)
        return self.vae, dict(device=self.device, dtype=self.dtype)

    def _fp32_vae(self):
        if self.dtype == torch.float32:
            return self.vae
        if self._vae_fp32 is None:
            self._vae_fp32 = copy.deepcopy(self.vae).float()
        return self._vae_fp32
