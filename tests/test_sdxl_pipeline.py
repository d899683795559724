"""SDXL against diffusers' SDXL pipelines on identical tiny random weights.

Same folder, prompt, negative prompt, seed, steps and guidance: every pixel within 2/255 of
``StableDiffusionXLPipeline`` for the SDXL default (euler) and five other sampler/schedule
pairs, with and without a negative prompt (an empty one is zeros, as diffusers' None); img2img
and inpainting against diffusers' SDXL img2img/inpaint pipelines; the base -> refiner hand-off
against diffusers' ``denoising_end``/``denoising_start`` recipe. Below the images: the U-Net's
text_time conditioning and both text encoders against diffusers/transformers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.pipeline import load_pipeline
from ldm.text.micro import MicroConditioning, time_ids

SIZE, STEPS, SCALE, SEED = 32, 4, 5.0, 1234  # 32 px = 16x16 latents (tiny VAE factor 2)
PROMPT, NEGATIVE = "a red circle above a blue square", "blurry"

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


@pytest.fixture(scope="module")
def ours(tiny_sdxl, tiny_sdxl_refiner):
    cache = {}

    def get(which="base"):
        if which not in cache:
            folder = tiny_sdxl if which == "base" else tiny_sdxl_refiner
            cache[which] = load_pipeline(str(folder), device="cpu", dtype="fp32", accel="off")
        return cache[which]

    return get


@pytest.fixture(scope="module")
def theirs(tiny_sdxl, tiny_sdxl_refiner):
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


def test_defaults_come_from_the_family_and_the_checkpoint(ours):
    pipe = ours()
    assert pipe.parts.family.name == "sdxl"
    assert pipe.sampling_defaults == dict(
        sampler="euler", schedule="default", steps=30, guidance_scale=5.0
    )
    assert pipe.default_size == (16, 16)  # sample_size 8 x factor 2 (1024 for the real one)
    assert pipe.force_zeros_for_empty_prompt


def test_empty_negative_is_zeros_only_with_force_zeros(ours):
    pipe = ours()
    r = pipe.prepare([PROMPT, PROMPT], [1, 2], negative_prompt=["", "x"], height=SIZE, width=SIZE)
    cond, uncond = pipe.encode_text(r.prompts, r.negatives, 1, True)
    cond, uncond = pipe.condition(r, cond, uncond)
    assert not uncond.context[0].any() and not uncond.pooled[0].any()
    assert uncond.context[1].abs().sum() > 0 and uncond.pooled[1].abs().sum() > 0
    assert torch.equal(cond.time_ids, torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))


def test_micro_conditioning_changes_the_image_and_negatives_default_to_positives(ours):
    pipe = ours()
    kwargs = dict(steps=2, height=SIZE, width=SIZE, sampler="euler")
    (plain,) = pipe([PROMPT], [SEED], **kwargs)
    micro = MicroConditioning(original_size=(SIZE, SIZE), target_size=(SIZE, SIZE))
    (same,) = pipe([PROMPT], [SEED], micro=micro, **kwargs)
    assert np.array_equal(_array(plain.image), _array(same.image))
    cropped = MicroConditioning(crops_coords_top_left=(256, 0), original_size=(2048, 2048))
    (other,) = pipe([PROMPT], [SEED], micro=cropped, **kwargs)
    assert np.abs(_array(other.image) - _array(plain.image)).max() > 0
    positive, negative = cropped.ids("size", SIZE, SIZE)
    assert torch.equal(positive, negative)
    assert torch.equal(positive, time_ids("size", (2048, 2048), (256, 0), (SIZE, SIZE)))


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


def test_unet_text_time_matches_diffusers(tiny_sdxl):
    from diffusers import UNet2DConditionModel as Theirs

    theirs = Theirs.from_pretrained(tiny_sdxl, subfolder="unet").eval()
    ours = load_pipeline(str(tiny_sdxl), "cpu", "fp32", accel="off").unet
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0])
    context, pooled = torch.randn(2, 7, 64), torch.randn(2, 32)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512, 768, 32, 16, 1024, 1024]])
    added = {"text_embeds": pooled, "time_ids": ids}
    with torch.no_grad():
        expected = theirs(x, t, context, added_cond_kwargs=added).sample
        got = ours(x, t, context, added_cond_kwargs=added)
        other = ours(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids * 0})
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (other - got).abs().max() > 1e-3  # the ids do reach the output


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_text_encoders_match_diffusers(clip_skip, ours, theirs):
    """Context = both encoders' penultimate states side by side; pooled = the second's."""
    pipe, ref = ours(), theirs()
    prompts = [PROMPT, "two (green:1.0) triangles"]
    context, _, pooled, _ = ref.encode_prompt(
        prompts, do_classifier_free_guidance=False, clip_skip=clip_skip - 1 or None
    )
    cond = pipe.text_encoder(clip_skip).encode(prompts)
    assert cond.context.shape == context.shape == (2, 77, 64)
    assert (cond.context - context).abs().max() <= 1e-5 * context.abs().max()
    assert (cond.pooled - pooled).abs().max() <= 1e-5 * pooled.abs().max()


def test_emphasis_weights_each_encoder_on_its_own(ours):
    """A1111 restores each embedder's mean separately; a shared mean would mix 768 and 1280."""
    from ldm.text.prompts import encode_prompts

    encoder = ours().text_encoder(1)
    plain = encode_prompts(encoder, ["a red circle"]).context
    weighted = encode_prompts(encoder, ["a (red:1.5) circle"]).context
    widths = encoder.widths
    for p, w in zip(plain.split(widths, -1), weighted.split(widths, -1)):
        assert torch.allclose(p.mean(), w.mean(), atol=1e-5)  # each part's mean is kept
        assert (p - w).abs().max() > 1e-3


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


def test_the_checkpoint_scheduler_picks_the_default_sampler(tiny_sdxl, tmp_path):
    import json
    import shutil

    from ldm.sampling.samplers import from_scheduler_config

    folder = shutil.copytree(tiny_sdxl, tmp_path / "dpm")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(_class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True)
    config_path.write_text(json.dumps(config))
    pipe = load_pipeline(str(folder), "cpu", "fp32", accel="off")
    assert pipe.sampling_defaults["sampler"] == "dpmpp_2m"
    assert pipe.sampling_defaults["schedule"] == "karras"
    sde = dict(config, algorithm_type="sde-dpmsolver++", use_karras_sigmas=False)
    assert from_scheduler_config(sde) == ("dpmpp_2m_sde", "default")
    assert from_scheduler_config(dict(config, _class_name="PNDMScheduler")) is None
    assert from_scheduler_config(dict(config, solver_order=3)) is None


def test_fp16_decodes_in_fp32_where_the_vae_asks(ours, tiny_sd1):
    pipe = ours()
    pipe.dtype = torch.float16  # only the choice is checked: fp16 convolutions are slow on CPUs
    try:
        vae, where = pipe._vae_for_pixels()
        assert where["dtype"] == torch.float32
        assert next(vae.parameters()).dtype == torch.float32
    finally:
        pipe.dtype = torch.float32
    sd1 = load_pipeline(str(tiny_sd1), "cpu", "fp32", accel="off")
    sd1.dtype = torch.float16  # SD 1.x pipelines (as diffusers') do not upcast
    assert sd1._vae_for_pixels()[1]["dtype"] == torch.float16


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


def test_long_prompts_and_break_chunk_both_encoders_pooled_from_the_first(ours):
    from ldm.text.prompts import encode_prompts

    encoder = ours().text_encoder(1)
    first = "a red circle above a blue square"
    cond = encode_prompts(encoder, [f"{first} BREAK two green triangles"])
    assert cond.context.shape == (1, 154, 64)  # two 77-token chunks, 32 + 32 features each
    alone = encoder.encode([first])
    assert torch.allclose(cond.pooled, alone.pooled, atol=1e-6)  # A1111: the first chunk's
    assert torch.allclose(cond.context[:, :77], alone.context, atol=1e-6)
    second = encoder.encode(["two green triangles"])
    assert torch.allclose(cond.context[:, 77:], second.context, atol=1e-6)
    long = encode_prompts(encoder, [", ".join(["a red circle"] * 40)])
    assert long.context.shape[1] == 77 * 3  # 120 + 39 tokens: nothing truncated
