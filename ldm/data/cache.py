"""On-disk caches of VAE latent distributions and text embeddings (one safetensors file per entry).

An entry's file name is a hash of everything that determines its value: the sample key and crop
(for latents) or the caption (for text), plus a hash of the encoder's weights. A changed crop,
flip or model therefore misses instead of reusing a stale entry. Files are written atomically.
The latent cache stores the posterior mean and std, so each step draws a fresh latent
``mean + std * randn`` (Kingma & Welling 2014, reparametrisation), as training on pixels would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm.data.images import CropParams
from ldm.io import atomic_save


def module_hash(module: torch.nn.Module) -> str:
    """sha256 over parameter and buffer names, shapes, dtypes and bytes (first 16 hex digits)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class _TensorCache:
    """Files ``<dir>/<hash[:2]>/<hash>.safetensors`` holding a dict of tensors."""

    def __init__(self, directory: str | Path, model_hash: str, dtype: torch.dtype | None):
        self.directory, self.model_hash, self.dtype = Path(directory), model_hash, dtype
        self.hits = self.misses = 0

    def _path(self, identity: list) -> Path:
        digest = hashlib.sha256(json.dumps([self.model_hash, *identity]).encode()).hexdigest()
        return self.directory / digest[:2] / f"{digest}.safetensors"

    def _get(self, identity: list) -> dict[str, torch.Tensor] | None:
        path = self._path(identity)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            tensors = load_file(path)
        except Exception:  # a damaged entry is a miss; it is rewritten on the next put
            self.misses += 1
            return None
        self.hits += 1
        return tensors

    def _put(self, identity: list, tensors: dict[str, torch.Tensor]) -> None:
        def cast(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().cpu()
            return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

        data = {name: cast(t).contiguous() for name, t in tensors.items()}
        atomic_save(self._path(identity), lambda tmp: save_file(data, str(tmp)))


class LatentCache(_TensorCache):
    """VAE posterior (mean, std) per (sample key, crop params, VAE hash); fp16 on disk."""

    def __init__(self, directory: str | Path, vae_hash: str, dtype=torch.float16):
        super().__init__(directory, vae_hash, dtype)

    def get(self, key: str, params: CropParams) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) as float32 (C, h, w), or None when absent or stale."""
        tensors = self._get([key, params.as_list()])
        if tensors is None:
            return None
        return tensors["mean"].float(), tensors["std"].float()

    def contains(self, key: str, params: CropParams) -> bool:
        return self._path([key, params.as_list()]).is_file()

    def put(self, key: str, params: CropParams, mean: torch.Tensor, std: torch.Tensor) -> None:
        self._put([key, params.as_list()], {"mean": mean, "std": std})

    @staticmethod
    def sample(
        mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One latent draw ``mean + std * eps`` (unscaled: apply the VAE's scale/shift after)."""
        device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=device)
        return mean + std * eps.to(mean.device)


class TextEmbeddingCache(_TensorCache):
    """Text-encoder outputs per (caption, encoder hash): a dict of tensors (context, pooled)."""

    def __init__(self, directory: str | Path, encoder_hash: str, dtype=torch.float16):
        super().__init__(directory, encoder_hash, dtype)

    def get(self, caption: str) -> dict[str, torch.Tensor] | None:
        tensors = self._get([caption])
        if tensors is None:
            return None
        return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}

    def put(self, caption: str, tensors: dict[str, torch.Tensor] | torch.Tensor) -> None:
        if isinstance(tensors, torch.Tensor):
            tensors = {"context": tensors}
        self._put([caption], tensors)


def precompute_latents(
    batches: Iterable[dict],
    cache: LatentCache,
    encode_dist: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    both_flips: bool = True,
) -> int:
    """Fill ``cache`` from one epoch of loader batches; ``encode_dist(pixels) -> (mean, std)``.

    Use a loader without a latent cache and with centre crops (random crops change every epoch
    and cannot be cached). With ``both_flips`` the mirrored crop is cached too, so a loader with
    ``flip=True`` hits in every epoch. Returns the number of entries written.
    """
    written = 0
    for batch in batches:
        jobs = [(i, c) for i, c in enumerate(batch["crops"])]
        if both_flips:
            jobs += [(i, dataclasses.replace(c, flip=not c.flip)) for i, c in jobs]
        jobs = [(i, c) for i, c in jobs if not cache.contains(batch["keys"][i], c)]
        if not jobs:
            continue
        pixels = batch["pixels"]  # (B, 3, H, W); a flipped crop is the crop mirrored
        inputs = torch.stack(
            [pixels[i].flip(-1) if c.flip != batch["crops"][i].flip else pixels[i] for i, c in jobs]
        )
        with torch.no_grad():
            mean, std = encode_dist(inputs)
        for row, (i, c) in enumerate(jobs):
            cache.put(batch["keys"][i], c, mean[row], std[row])
            written += 1
    return written


def precompute_text(
    captions: Iterable[str],
    cache: TextEmbeddingCache,
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    batch_size: int = 32,
) -> int:
    """Fill ``cache`` for each distinct caption; ``encode(list) -> {name: (B, ...)}``."""
    todo = sorted({c for c in captions if cache.get(c) is None})
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        with torch.no_grad():
            out = encode(chunk)
        for row, caption in enumerate(chunk):
            cache.put(caption, {k: v[row] for k, v in out.items() if v is not None})
    return len(todo)
