"""The teacher's own samples as distillation data (``data.source: teacher``).

Data-free distillation: no image-caption folder, only a prompt file. Each prompt (in turn, up
to ``data.cache_size`` samples) is sampled once by the teacher at the distill stage's guidance
with its default sampler, and the latents (never decoded) are kept in the run folder
(``cache/teacher-<key>.safetensors``, the key covering model, prompts and settings), so a
resumed run reads them back instead of sampling again. Batches then index that pool like the
shapes world's latent cache: a pure function of (step, rank).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ldm.errors import ConfigError
from ldm.formats.safe_load import load_state_dict, save_state_dict
from ldm.train.batches import TrainBatch, uncropped
from ldm.train.config import DataConfig

CHUNK = 16  # prompts per teacher call
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def read_prompts(path: str | None) -> list[str]:
    """Non-empty lines of a prompt file that are not # comments."""
    if not path:
        raise ConfigError("data.source teacher: set data.prompts (a file, one prompt per line)")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.prompts {path}: cannot read ({e})") from None
    prompts = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    if not prompts:
        raise ConfigError(f"data.prompts {path}: no prompts")
    return prompts


class TeacherSamples:
    """A pool of teacher samples (latents) with their prompts, indexed by step."""

    def __init__(self, data: DataConfig, batch_size: int, rank: int = 0, world: int = 1):
        prompts = read_prompts(data.prompts)
        self.config = data
        self.pool = data.cache_size or len(prompts)  # number of samples
        self.captions = [prompts[i % len(prompts)] for i in range(self.pool)]
        self.batch_size = batch_size  # per process
        self.rank, self.world = rank, world
        self.latents: torch.Tensor | None = None  # (pool, C, h, w) model-space latents

    def indices(self, step: int) -> list[int]:
        start = (step * self.world + self.rank) * self.batch_size
        return [i % self.pool for i in range(start, start + self.batch_size)]

    def batch(self, step: int) -> TrainBatch:
        idx = self.indices(step)
        res = self.config.resolution
        return TrainBatch([self.captions[i] for i in idx], uncropped(res, res, len(idx)),
                          latents=self.latents[idx].float())  # fmt: skip

    def images(self, step: int):
        raise ConfigError("data.source teacher holds latents only (no VAE stage on it)")

    def all_captions(self) -> list[str]:
        return list(self.captions)

    @torch.no_grad()
    def generate(self, parts, distiller, device, seed: int, cache_dir: Path, log) -> None:
        """Sample the pool with the distiller's teacher, or read it back from the cache."""
        res, steps = self.config.resolution, self.config.teacher_steps
        guidance = distiller.config.guidance_scale
        settings = {"prompts": self.captions, "guidance": guidance, "steps": steps,
                    "seed": seed, "resolution": res}  # fmt: skip
        # the key covers the teacher's weights and the settings: another teacher or prompt misses
        key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]
        with distiller.teacher_weights() as unet:
            key = f"{weights_hash(unet)}-{key}"
        path = Path(cache_dir) / f"teacher-{key}.safetensors"
        if path.exists():
            self.latents = load_state_dict(path)["latents"]
            log.info(f"teacher samples: {len(self.latents)} read from {path}")
            return
        log.info(f"teacher samples: sampling {self.pool} (guidance {guidance}) into {path}")
        modules = [m for n in PARTS if (m := getattr(parts, n, None)) is not None]
        grads = [(p, p.requires_grad) for m in modules for p in m.parameters()]
        modes = [(m, m.training) for top in modules for m in top.modules()]
        try:
            with distiller.teacher_weights() as unet:
                self.latents = self._sample(parts, unet, device, guidance, steps, seed, res)
        finally:  # the pipeline froze the parts: the stage's trainable state comes back
            for p, flag in grads:
                p.requires_grad_(flag)
            for m, training in modes:
                m.train(training)
        save_state_dict({"latents": self.latents}, path)

    def _sample(self, parts, unet, device, guidance, steps, seed, res) -> torch.Tensor:
        """(pool, C, h, w) float16 latents: prompt i with seed + i, the teacher's sampler."""
        from ldm.pipeline import Pipeline

        pipe = Pipeline(parts, device, torch.float32, accel="off")  # training weights: no packing
        pipe.unet = unet
        chunks = []
        for lo in range(0, self.pool, CHUNK):
            prompts = self.captions[lo : lo + CHUNK]
            seeds = [seed + lo + i for i in range(len(prompts))]
            r = pipe.prepare(prompts, seeds, steps=steps, guidance_scale=guidance, height=res,
                             width=res)  # fmt: skip
            cond, uncond = pipe.encode_text(r.prompts, r.negatives, r.clip_skip, guidance > 1)
            cond, uncond = pipe.condition(r, cond, uncond)
            chunks.append(pipe.denoise(r, cond, uncond).to("cpu", torch.float16))
        return torch.cat(chunks)


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's tensors but LoRA's (any memory layout), first 12 hex digits."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if ".lora_" in name:  # a LoRA student's adapters, off while it is the teacher
            continue
        h.update(name.encode())
        h.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:12]
