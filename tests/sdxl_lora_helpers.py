"""The shared pieces of the SDXL LoRA tests (test_sdxl_lora.py, test_sdxl_lora_diffusers.py):
random LoRA pairs on ldm's modules, and diffusers' own loader (``load_lora_weights`` +
``fuse_lora``, which must warn about nothing) as the reference for the merged weights.
"""

from __future__ import annotations

import logging
import warnings

import torch

from ldm.formats.lora import LoraModule

PARTS = ("unet", "text_encoder", "text_encoder_2")
RANK = 2


def _pair(weight: torch.Tensor, gen: torch.Generator, size: float = 0.1):
    """A random (down, up) for ``weight``; kxk convolutions as kohya's LoCon (1x1 up)."""
    down = torch.randn(RANK, *weight.shape[1:], generator=gen)
    up = size * torch.randn(
        weight.shape[0], RANK, *([1, 1] if weight.ndim == 4 else []), generator=gen
    )
    return down, up


def _every_module_lora(parts, seed: int = 0) -> list[LoraModule]:
    """A LoRA on every Linear / Conv2d of ldm's U-Net and both text encoders (scale 1/2)."""
    gen = torch.Generator().manual_seed(seed)
    modules = []
    for part in PARTS:
        for name, module in getattr(parts, part).named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                modules.append(LoraModule(part, name, *_pair(module.weight, gen), alpha=1.0))
    return modules


def _text_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """A CLIP submodule whether or not transformers nests it under text_model (< 5, projection)."""
    return model.get_submodule(("text_model." if hasattr(model, "text_model") else "") + path)


def _diffusers_merged(folder, lora_file) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers loads ``lora_file`` (warning about nothing) and fuses it: its state dicts."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    records: list[logging.LogRecord] = []
    log = logging.Handler(logging.WARNING)
    log.emit = records.append
    diffusers_logging.get_logger("diffusers").addHandler(log)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(lora_file))
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(log)
    said = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    noise = [m for m in said if "lora" in m.lower()]
    assert not noise, noise  # e.g. "unexpected keys", "keys have not been correctly renamed"
    pipe.fuse_lora(components=list(PARTS), lora_scale=1.0)
    pipe.unload_lora_weights()
    return {part: getattr(pipe, part).state_dict() for part in PARTS}


def _assert_same_weights(ours, reference: dict, base) -> int:
    """Every tensor of ldm's parts equals diffusers'; returns how many the LoRA changed."""
    changed = 0
    for part in PARTS:
        mine, theirs = getattr(ours, part).state_dict(), reference[part]
        before = getattr(base, part).state_dict()
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=key)
            changed += not torch.equal(value, before[key])
    return changed
