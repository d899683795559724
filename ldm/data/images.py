"""Safe image decoding and the train-time transforms: resize, crop, flip, to a [-1, 1] tensor.

A broken file must never stop training: every failure becomes ``SkipImage(reason)``, which the
loader records in the run folder's skip list. Oversized images (decompression bombs) are rejected
from the header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import typing
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# PIL's own default bomb limit (~89 Mpx); ours is configurable per loader.
DEFAULT_MAX_PIXELS = 89_478_485

ImageData = bytes | Image.Image | np.ndarray | typing.BinaryIO


class SkipImage(Exception):
    """An image or caption that cannot be used; the message is the reason written to the log.

    Reasons read ``"<kind>: <details>"``; the kind (e.g. ``zero-byte file``) is what gets counted.
    """

    @property
    def kind(self) -> str:
        return str(self).split(":")[0]


@dataclass(frozen=True)
class CropParams:
    """How one image became a training crop (also the latent-cache key, with the VAE hash).

    size: (W, H) of the crop (the bucket); resized: (W, H) after resizing, before cropping;
    left/top: crop offset in the resized image; flip: mirrored horizontally after cropping;
    original: (W, H) of the source image (SDXL-style micro-conditioning).
    """

    size: tuple[int, int]
    resized: tuple[int, int]
    left: int
    top: int
    flip: bool
    original: tuple[int, int]

    def as_list(self) -> list:
        return [*self.size, *self.resized, self.left, self.top, int(self.flip), *self.original]

    def size_conditioning(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """SDXL micro-conditioning of this crop (Podell et al. 2023, sec. 2.2), all (h, w) order:
        original size before resizing, the crop's (top, left) in the resized image, and the
        target size (the crop, i.e. the bucket).

        A mirrored crop is the same window cut from the mirrored image, whose left offset is
        ``resized_w - left - w``: diffusers' SDXL trainer flips before cropping and kohya's
        measures the flipped left edge from the right, both giving the offset in the image the
        network sees.
        """
        (w, h), (rw, _) = self.size, self.resized
        left = rw - self.left - w if self.flip else self.left
        return (self.original[1], self.original[0]), (self.top, left), (h, w)


def _open_checked(data: ImageData, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and reject empty, unreadable or oversized images."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim not in (2, 3):
            raise SkipImage(
                f"unreadable image: array must be uint8 (H,W[,C]), got {data.dtype} {data.shape}"
            )
        return Image.fromarray(data)
    if isinstance(data, Image.Image):
        return data
    stream = io.BytesIO(data) if isinstance(data, bytes) else data  # a file: header reads only
    if not stream.read(1):
        raise SkipImage("zero-byte file: 0 bytes")
    stream.seek(0)
    try:
        # PIL warns above Image.MAX_IMAGE_PIXELS and raises at twice that; both mean "bomb".
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(stream)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipImage(f"oversized image: decompression bomb ({e})") from None
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError from plugins, ...
        raise SkipImage(f"unreadable image: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise SkipImage(f"empty image: size {w}x{h}")
    if w * h > max_pixels:
        raise SkipImage(f"oversized image: {w}x{h} > max_pixels {max_pixels}")
    return img


def probe_size(data: ImageData, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(W, H) from the image header, without decoding pixels; raises SkipImage."""
    return _open_checked(data, max_pixels).size


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited on white (palette and alpha images)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: ImageData, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode to an RGB image; corrupt or truncated files raise SkipImage."""
    img = _open_checked(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()  # decodes everything: truncated / corrupt data fails here
            return to_rgb(img)
    except SkipImage:
        raise
    except Exception as e:
        raise SkipImage(f"corrupt or truncated image: {type(e).__name__}: {e}") from None


def cover_size(image_size: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """Smallest (W, H) with the image's aspect ratio that covers ``size`` (resize before crop)."""
    (w, h), (tw, th) = image_size, size
    scale = max(tw / w, th / h)
    # rounding can fall a pixel short of the target; the crop needs at least the target
    return max(tw, int(w * scale + 0.5)), max(th, int(h * scale + 0.5))


def crop_params(
    image_size: tuple[int, int],
    size: tuple[int, int],
    resized: tuple[int, int] | None = None,
    random_crop: bool = False,
    flip: bool = False,
    rng: np.random.Generator | None = None,
) -> CropParams:
    """Choose the resize and the crop window: centre crop, or uniform random offsets from rng.

    ``resized`` defaults to ``cover_size``; with ``flip`` the crop is mirrored with probability
    0.5 (drawn from ``rng``). The draws come from ``rng`` only, so a crop is reproducible.
    """
    rw, rh = resized if resized is not None else cover_size(image_size, size)
    rw, rh = max(rw, size[0]), max(rh, size[1])
    extra_w, extra_h = rw - size[0], rh - size[1]
    if random_crop:
        if rng is None:
            raise ValueError("random_crop needs an rng")
        left, top = int(rng.integers(0, extra_w + 1)), int(rng.integers(0, extra_h + 1))
    else:
        left, top = extra_w // 2, extra_h // 2
    do_flip = bool(flip and rng is not None and rng.random() < 0.5)
    return CropParams(tuple(size), (rw, rh), left, top, do_flip, tuple(image_size))


def apply_crop(img: Image.Image, params: CropParams) -> Image.Image:
    """Resize to ``params.resized`` (Lanczos down, bicubic up), crop, and maybe mirror."""
    if img.size != params.resized:
        down = params.resized[0] * params.resized[1] < img.size[0] * img.size[1]
        resample = Image.Resampling.LANCZOS if down else Image.Resampling.BICUBIC
        img = img.resize(params.resized, resample)
    w, h = params.size
    img = img.crop((params.left, params.top, params.left + w, params.top + h))
    if params.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB image -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return torch.from_numpy(np.ascontiguousarray(array) / np.float32(127.5) - np.float32(1.0))


def load_crop(
    data: ImageData, params: CropParams, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Decode, resize, crop and flip one image into a (3, H, W) tensor in [-1, 1]."""
    img = decode_image(data, max_pixels)
    if img.size != params.original:
        raise SkipImage(f"image changed since the scan: {img.size} != {params.original}")
    return to_tensor(apply_crop(img, params))
