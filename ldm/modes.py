"""img2img, inpainting and outpainting: how an init image and a mask change the sampling.

img2img (SDEdit, Meng et al. 2021) starts from the encoded image noised to the sigma at
``strength``. Inpainting with an ordinary model blends the known latents back into the denoised
prediction at every step (as A1111's CFG denoiser does; for flow models this equals diffusers'
re-noising of the known region, see ``blend_known``); a 9-channel inpainting U-Net instead gets
the mask and the masked image's latents as extra input channels (Rombach et al. 2022, Sec. 4.5).
Outpainting pads the canvas and inpaints the new border.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ldm.errors import LdmError


def load_image(path: str | Path, flag: str) -> Image.Image:
    """Open an image file; a missing or unreadable file is a one-line error naming the flag."""
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise LdmError(f"{flag} {path}: cannot read image ({type(e).__name__}: {e})") from None


def image_to_tensor(
    image: Image.Image, height: int, width: int, normalize: bool = True
) -> torch.Tensor:
    """PIL image -> (1, C, H, W) float in [-1, 1] (RGB) or [0, 1] (``normalize=False``)."""
    if not normalize:
        image = image.convert("L")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = array[..., None] if array.ndim == 2 else array
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)[None]  # (1, C, H, W)
    return tensor * 2 - 1 if normalize else tensor


def latent_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(1, 1, H, W) pixel mask -> (1, 1, h, w) latent mask (nearest, as diffusers' inpaint)."""
    return F.interpolate(mask, size=(height, width))


def encode_each(vae, pixels: torch.Tensor, generators, device, dtype) -> torch.Tensor:
    """VAE-encode the (same) image once per generator, sampling the posterior with it."""
    pixels = pixels.to(device, dtype)
    latents = [vae.encode(pixels, generator=g, sample=True) for g in generators]
    return torch.cat(latents).float()  # (B, C, h, w)


def inpaint_inputs(vae, mask: Image.Image, pixels, generators, inpainting_model, device, dtype):
    """(keep mask for latent blending, None) or, for 9-channel U-Nets, (None, extra channels)."""
    height, width = pixels.shape[-2:]
    mask_px = image_to_tensor(mask.convert("L"), height, width, normalize=False)
    mask_px = (mask_px >= 0.5).float()  # white = repaint, binarized like diffusers
    m = latent_mask(mask_px, height // vae.factor, width // vae.factor).to(device)
    if not inpainting_model:
        return 1.0 - m, None
    masked = pixels * (mask_px < 0.5)  # the known part of the image only
    masked_latents = encode_each(vae, masked, generators, device, dtype)
    extra = torch.cat([m.expand(len(generators), -1, -1, -1), masked_latents], dim=1)
    return None, extra.to(dtype)  # (B, 1 + C, h, w)


def blend_known(denoise, init_latents: torch.Tensor, keep: torch.Tensor):
    """Replace the prediction by the init latents where ``keep`` is 1 (latent blending).

    This is also the flow form of diffusers' StableDiffusion3InpaintPipeline, which re-noises
    the known region to each step's sigma, x = (1 - sigma) x0 + sigma eps with the first noise
    eps: a deterministic step (Euler x' = (sigma'/sigma) x + (1 - sigma'/sigma) D, Heun, DPM++ 2M,
    whose D's are all x0 there) maps that form at sigma to the same form at sigma' (x0 + sigma eps
    likewise for VP models), so the known region stays exactly re-noised without drawing eps
    again (tests/test_sd3_generation.py); ancestral/SDE samplers re-noise it with their own noise.
    """

    def blended(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        denoised = denoise(x, sigma)
        return keep * init_latents.to(denoised.dtype) + (1 - keep) * denoised

    return blended


def parse_outpaint(text: str) -> tuple[int, int, int, int]:
    """ "L,R,U,D" pixels (one number = all sides) -> (left, right, up, down)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 4
    if len(values) != 4 or min(values) < 0 or max(values) == 0:
        raise LdmError(f"--outpaint {text!r}: expected LEFT,RIGHT,UP,DOWN pixels >= 0 (not all 0)")
    return tuple(values)


def outpaint_canvas(
    image: Image.Image, pads: tuple[int, int, int, int], factor: int, overlap: int = 8
) -> tuple[Image.Image, Image.Image]:
    """Pad ``image`` by (left, right, up, down) pixels -> (canvas, mask of the area to paint).

    The right and bottom pads grow so the canvas is a multiple of the latent factor. New pixels
    repeat the nearest edge (a neutral start for the known part of each latent), and the mask
    reaches ``overlap`` pixels into the old image so the seam is repainted too.
    """
    left, right, up, down = pads
    image = image.convert("RGB")
    width, height = image.width + left + right, image.height + up + down
    right += -width % factor
    down += -height % factor
    array = np.pad(np.asarray(image), ((up, down), (left, right), (0, 0)), mode="edge")
    canvas = Image.fromarray(array)
    mask = np.ones(array.shape[:2], dtype=np.uint8) * 255
    keep_box = (
        up + (overlap if up else 0),
        up + image.height - (overlap if down else 0),
        left + (overlap if left else 0),
        left + image.width - (overlap if right else 0),
    )
    mask[keep_box[0] : keep_box[1], keep_box[2] : keep_box[3]] = 0
    return canvas, Image.fromarray(mask)
