"""SDXL images against diffusers' SDXL pipelines on identical tiny random weights.

Same folder, prompt, negative prompt, seed, steps and guidance: every pixel within 2/255 of
``StableDiffusionXLPipeline`` for the SDXL default (euler) and five other sampler/schedule
pairs, with and without a negative prompt (an empty one is zeros, as diffusers' None); img2img
and inpainting (4- and 9-channel U-Nets) against diffusers' SDXL img2img/inpaint pipelines; the
base -> refiner hand-off against diffusers' ``denoising_end``/``denoising_start`` recipe; the
same images through ``ldm txt2img --refiner`` and ``ldm batch``. The conditioning below the
images (text encoders, text_time ids, defaults) is in test_sdxl_conditioning.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sdxl_pipeline_helpers import (  # noqa: F401 (fixtures)
    NEGATIVE,
    PROMPT,
    SCALE,
    SEED,
    SIZE,
    STEPS,
    _array,
    _diffusers,
    ours_fixture,
    theirs_fixture,
)

from ldm.pipeline import load_pipeline
from ldm.text.micro import MicroConditioning

# case -> our sampler, schedule, diffusers scheduler class, extra from_config kwargs
CASES = {
    "euler": ("euler", "default", "EulerDiscreteScheduler", {}),
    "euler_ancestral": ("euler_ancestral", "default", "EulerAncestralDiscreteScheduler", {}),
    "ddim": ("ddim", "default", "DDIMScheduler", {}),
    "dpmpp_2m": ("dpmpp_2m", "default", "DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": (
        "dpmpp_2m", "karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}
    ),
    "dpmpp_2m_sde": (
        "dpmpp_2m_sde", "default", "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("negative", ["", NEGATIVE])
@pytest.mark.parametrize("case", list(CASES))
def test_txt2img_matches_diffusers(case, negative, ours, theirs):
    sampler, schedule, scheduler, extra = CASES[case]
    expected = _array(
        _diffusers(
            theirs(), scheduler, extra, prompt=PROMPT, negative_prompt=negative or None,
            num_inference_steps=STEPS, height=SIZE, width=SIZE,
        )
    )  # fmt: skip
    (result,) = ours()(
        [PROMPT], [SEED], negative_prompt=negative, steps=STEPS, guidance_scale=SCALE,
        sampler=sampler, schedule=schedule, height=SIZE, width=SIZE,
    )  # fmt: skip
    diff = np.abs(_array(result.image) - expected)
    assert diff.max() <= 2, f"{case}, negative {negative!r}: max pixel diff {diff.max()}/255"
    assert expected.std() > 5  # a real image, not a constant one that would trivially agree


def test_micro_conditioning_matches_diffusers(ours, theirs):
    kwargs = dict(original_size=(64, 48), crops_coords_top_left=(4, 8), target_size=(32, 32))
    expected = _array(
        _diffusers(
            theirs(), "EulerDiscreteScheduler", {}, prompt=PROMPT, num_inference_steps=3,
            height=SIZE, width=SIZE, negative_original_size=(32, 32),
            negative_target_size=(16, 16), **kwargs,
        )
    )  # fmt: skip
    micro = MicroConditioning(
        **kwargs, negative_original_size=(32, 32), negative_target_size=(16, 16),
        negative_crops_coords_top_left=(0, 0),
    )  # fmt: skip
    (result,) = ours()([PROMPT], [SEED], steps=3, guidance_scale=SCALE, height=SIZE, width=SIZE,
                       sampler="euler", micro=micro)  # fmt: skip
    assert np.abs(_array(result.image) - expected).max() <= 2


def test_img2img_matches_diffusers(ours, theirs):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), np.uint8))
    expected = _array(
        _diffusers(
            theirs("StableDiffusionXLImg2ImgPipeline"), "EulerDiscreteScheduler", {},
            prompt=PROMPT, negative_prompt=NEGATIVE, image=init, strength=0.6,
            num_inference_steps=STEPS,
        )
    )  # fmt: skip
    (result,) = ours()(
        [PROMPT], [SEED], negative_prompt=NEGATIVE, init_image=init, strength=0.6, steps=STEPS,
        guidance_scale=SCALE, sampler="euler",
    )  # fmt: skip
    assert result.record["mode"] == "img2img"
    assert np.abs(_array(result.image) - expected).max() <= 2


def test_inpaint_matches_diffusers(ours, theirs):
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), np.uint8))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 4:20] = 255
    mask = Image.fromarray(mask)
    expected = _array(
        _diffusers(
            theirs("StableDiffusionXLInpaintPipeline"), "EulerDiscreteScheduler", {},
            prompt=PROMPT, image=init, mask_image=mask, strength=1.0, height=SIZE, width=SIZE,
            num_inference_steps=3,
        )
    )  # fmt: skip
    (result,) = ours()(
        [PROMPT], [SEED], init_image=init, mask=mask, strength=1.0, steps=3,
        guidance_scale=SCALE, sampler="euler",
    )  # fmt: skip
    assert result.record["mode"] == "inpaint"
    assert np.abs(_array(result.image) - expected).max() <= 2


def test_refiner_hand_off_matches_diffusers(ours, theirs):
    """Base to 80 % of the noise, refiner from there: diffusers' ensemble-of-experts recipe."""
    from ldm.refiner import generate_with_refiner

    base = theirs()
    refiner = theirs("StableDiffusionXLImg2ImgPipeline", theirs.refiner_folder)
    generator = torch.Generator("cpu").manual_seed(SEED)
    latents = _diffusers(
        base, "EulerDiscreteScheduler", {}, prompt=PROMPT, negative_prompt=NEGATIVE,
        num_inference_steps=10, denoising_end=0.8, output_type="latent", height=SIZE,
        width=SIZE, generator=generator,
    )[None]  # fmt: skip
    expected = _array(
        _diffusers(
            refiner, "EulerDiscreteScheduler", {}, prompt=PROMPT, negative_prompt=NEGATIVE,
            num_inference_steps=10, denoising_start=0.8, image=latents, generator=generator,
        )
    )  # fmt: skip
    (result,) = generate_with_refiner(
        ours(), ours("refiner"), [PROMPT], [SEED], switch_at=0.8, negative_prompt=NEGATIVE,
        steps=10, guidance_scale=SCALE, sampler="euler", height=SIZE, width=SIZE,
    )  # fmt: skip
    assert result.record["refiner"] == ours("refiner").model_name
    assert result.record["refiner_switch_at"] == 0.8
    assert np.abs(_array(result.image) - expected).max() <= 2
    assert expected.std() > 5


def test_refiner_infotext_is_a1111s_and_reads_back():
    from ldm.infotext import format_infotext, parse_infotext

    params = dict(prompt="a cat", steps=30, sampler="euler", guidance_scale=5.0, seed=1,
                  width=1024, height=1024, refiner="sd_xl_refiner_1.0",
                  refiner_hash="7440042bbd", refiner_switch_at=0.8)  # fmt: skip
    text = format_infotext(params)
    assert "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8" in text
    back = parse_infotext(text)
    assert back["refiner"] == "sd_xl_refiner_1.0" and back["refiner_hash"] == "7440042bbd"
    assert back["refiner_switch_at"] == 0.8


def test_txt2img_cli_runs_base_and_refiner(tiny_sdxl, tiny_sdxl_refiner, tmp_path):
    import json
    import subprocess
    import sys

    from ldm.infotext import read_png_metadata

    cmd = [sys.executable, "-m", "ldm", "txt2img", "--model", str(tiny_sdxl), "--prompt", "a cat",
           "--refiner", str(tiny_sdxl_refiner), "--refiner-switch-at", "0.7", "--steps", "4",
           "--height", "32", "--width", "32", "--seed", "5", "--original-size", "64x64",
           "--crop", "2,4", "--outdir", str(tmp_path), "--no-progress",
           "--accel", "off"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (path,) = [line for line in done.stdout.splitlines() if line.endswith(".png")]
    infotext, record = read_png_metadata(path)
    assert "Refiner switch at: 0.7" in infotext and f"Refiner: {tiny_sdxl_refiner.name}" in infotext
    micro = record["micro_conditioning"]
    assert micro["original_size"] == [64, 64] and micro["crops_coords_top_left"] == [2, 4]
    again = subprocess.run(cmd[:4] + ["--from-png", path, "--outdir", str(tmp_path / "again"),
                                      "--no-progress", "--accel", "off"],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr
    (path2,) = [line for line in again.stdout.splitlines() if line.endswith(".png")]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(path2)))
    assert json.dumps(read_png_metadata(path2)[1]["micro_conditioning"]) == json.dumps(micro)
    bad = subprocess.run(cmd[:6] + ["--prompt", "x", "--crop", "1x2"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "--crop" in bad.stderr


def test_nine_channel_inpainting_matches_diffusers(tmp_path, tiny_sdxl):
    import json
    import shutil

    import diffusers

    folder = shutil.copytree(tiny_sdxl, tmp_path / "inpaint")  # an SDXL inpainting checkpoint
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    torch.manual_seed(1)
    diffusers.UNet2DConditionModel.from_config(unet.config, in_channels=9).save_pretrained(
        folder / "unet"
    )
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLInpaintPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), np.uint8))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 4:20] = 255
    mask = Image.fromarray(mask)
    theirs = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    theirs.folder_scheduler_config = dict(theirs.scheduler.config)
    expected = _array(
        _diffusers(
            theirs, "EulerDiscreteScheduler", {}, prompt=PROMPT, image=init, mask_image=mask,
            strength=1.0, height=SIZE, width=SIZE, num_inference_steps=3,
        )
    )  # fmt: skip
    pipe = load_pipeline(str(folder), device="cpu", dtype="fp32", accel="off")
    assert pipe.parts.family.name == "sdxl" and pipe.is_inpainting_model
    from ldm.formats.diffusers_folder import save_folder

    saved = json.loads(
        (save_folder(pipe.parts, tmp_path / "saved") / "model_index.json").read_text()
    )
    assert saved["_class_name"] == "StableDiffusionXLInpaintPipeline"  # as diffusers saves it
    (result,) = pipe(
        [PROMPT], [SEED], init_image=init, mask=mask, strength=1.0, steps=3,
        guidance_scale=SCALE, sampler="euler",
    )  # fmt: skip
    assert np.abs(_array(result.image) - expected).max() <= 2


def test_batch_gives_txt2img_images(tiny_sdxl, tmp_path):
    """ldm batch (text cache, encode hook) and the plain call make the same SDXL image."""
    import subprocess
    import sys

    prompts = tmp_path / "prompts.txt"
    prompts.write_text('--prompt "a red circle" --seed 4\n'
                       '--prompt "a red circle" --seed 5 --negative_prompt blurry\n')  # fmt: skip
    cmd = [sys.executable, "-m", "ldm", "batch", "--prompts", str(prompts), "--model",
           str(tiny_sdxl), "--height", "32", "--width", "32", "--steps", "3", "--outdir",
           str(tmp_path / "out"), "--batch-size", "2", "--no-progress",
           "--accel", "off"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    pipe = load_pipeline(str(tiny_sdxl), "cpu", "fp32", accel="off")
    for seed, negative in ((4, ""), (5, "blurry")):
        (alone,) = pipe(["a red circle"], [seed], negative_prompt=negative, steps=3,
                        height=32, width=32)  # fmt: skip
        (made,) = [p for p in (tmp_path / "out").glob("*.png") if _seed(p) == seed]
        assert np.abs(_array(Image.open(made)) - _array(alone.image)).max() <= 1


def _seed(path) -> int:
    from ldm.infotext import read_png_metadata

    return read_png_metadata(path)[1]["seed"]
