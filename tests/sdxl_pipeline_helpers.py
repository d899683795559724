"""The shared setup of the SDXL pipeline tests (test_sdxl_pipeline.py, test_sdxl_conditioning.py):
ldm's and diffusers' pipelines on the same tiny random SDXL folders, loaded once per module, and
a diffusers image with the scheduler rebuilt from the folder's config for every case.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.pipeline import load_pipeline

SIZE, STEPS, SCALE, SEED = 32, 4, 5.0, 1234  # 32 px = 16x16 latents (tiny VAE factor 2)
PROMPT, NEGATIVE = "a red circle above a blue square", "blurry"


@pytest.fixture(scope="module", name="ours")
def ours_fixture(tiny_sdxl, tiny_sdxl_refiner):
    cache = {}

    def get(which="base"):
        if which not in cache:
            folder = tiny_sdxl if which == "base" else tiny_sdxl_refiner
            cache[which] = load_pipeline(str(folder), device="cpu", dtype="fp32", accel="off")
        return cache[which]

    return get


@pytest.fixture(scope="module", name="theirs")
def theirs_fixture(tiny_sdxl, tiny_sdxl_refiner):
    import diffusers

    cache = {}

    def get(cls_name="StableDiffusionXLPipeline", folder=None):
        folder = folder or tiny_sdxl
        if (cls_name, folder) not in cache:
            pipe = getattr(diffusers, cls_name).from_pretrained(folder)
            pipe.set_progress_bar_config(disable=True)
            pipe.folder_scheduler_config = dict(pipe.scheduler.config)
            cache[cls_name, folder] = pipe
        return cache[cls_name, folder]

    get.refiner_folder = tiny_sdxl_refiner
    return get


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _diffusers(pipe, scheduler, extra, **kwargs):
    import diffusers

    config = pipe.folder_scheduler_config  # from the folder each time: no case leaks into the next
    pipe.scheduler = getattr(diffusers, scheduler).from_config(config, **extra)
    kwargs.setdefault("generator", torch.Generator("cpu").manual_seed(SEED))
    return pipe(guidance_scale=SCALE, **kwargs).images[0]
