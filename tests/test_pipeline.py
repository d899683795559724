"""The pipeline against diffusers' StableDiffusionPipeline on identical tiny random weights.

Same folder, seed, steps and guidance scale: every pixel within 2/255 of diffusers for the SD1
(eps) and SD2 (v-prediction) shapes and six sampler/schedule pairs. Plus: a batch equals single
runs for a stochastic sampler; img2img and 9-channel inpainting against diffusers' own pipelines;
inpaint blending keeps the known latents; bad requests are one-line LdmErrors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import LdmError
from ldm.pipeline import Generated, load_pipeline, model_hash

SIZE, STEPS, SCALE, SEED = 32, 4, 7.5, 1234  # 32 px = 16x16 latents (tiny VAE factor 2)
PROMPT, NEGATIVE = "a red circle above a blue square", "blurry"

# our sampler, schedule -> diffusers scheduler class name, extra from_config kwargs
CASES = {
    "ddim": ("ddim", "default", "DDIMScheduler", {}),
    "euler": ("euler", "default", "EulerDiscreteScheduler", {}),
    "heun": ("heun", "default", "HeunDiscreteScheduler", {}),
    "lms": ("lms", "default", "LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("dpmpp_2m", "default", "DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": (
        "dpmpp_2m", "karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tiny_sd1, tiny_sd2):
    return {"sd1": tiny_sd1, "sd2": tiny_sd2}


@pytest.fixture(scope="module")
def ours(folders):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = load_pipeline(str(folders[kind]), device="cpu", dtype="fp32")
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def theirs(folders):
    import diffusers

    cache = {}

    def get(kind, cls_name="StableDiffusionPipeline"):
        if (kind, cls_name) not in cache:
            cls = getattr(diffusers, cls_name)
            pipe = cls.from_pretrained(folders[kind], safety_checker=None)
            pipe.set_progress_bar_config(disable=True)
            pipe.folder_scheduler_config = dict(pipe.scheduler.config)  # as saved in the folder
            cache[kind, cls_name] = pipe
        return cache[kind, cls_name]

    return get


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _diffusers_image(pipe, scheduler, extra, seed=SEED, **kwargs) -> np.ndarray:
    import diffusers

    # from the folder's config each time: a previous case's kwargs must not leak in
    config = getattr(pipe, "folder_scheduler_config", pipe.scheduler.config)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(config, **extra)
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(generator=generator, guidance_scale=SCALE, output_type="pil", **kwargs)
    return _array(out.images[0])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_txt2img_matches_diffusers(kind, case, ours, theirs):
    sampler, schedule, scheduler, extra = CASES[case]
    negative = NEGATIVE if case == "euler" else ""  # one case exercises negative prompts
    expected = _diffusers_image(
        theirs(kind), scheduler, extra, prompt=PROMPT, negative_prompt=negative or None,
        num_inference_steps=STEPS, height=SIZE, width=SIZE,
    )  # fmt: skip
    (result,) = ours(kind)(
        [PROMPT], [SEED], negative_prompt=negative, steps=STEPS, guidance_scale=SCALE,
        sampler=sampler, schedule=schedule, height=SIZE, width=SIZE,
    )  # fmt: skip
    assert isinstance(result, Generated) and result.image.size == (SIZE, SIZE)
    diff = np.abs(_array(result.image) - expected)
    assert diff.max() <= 2, f"{kind} {case}: max pixel diff {diff.max()}/255"
    assert expected.std() > 5  # a real image, not a constant one that would trivially agree


def test_txt2img_matches_diffusers_at_64px(ours, theirs):
    """One case at 64x64 (32x32 latents) so spatial size is not special."""
    expected = _diffusers_image(
        theirs("sd2"), "DPMSolverMultistepScheduler", {}, prompt=PROMPT, negative_prompt=NEGATIVE,
        num_inference_steps=3, height=64, width=64,
    )  # fmt: skip
    (result,) = ours("sd2")(
        [PROMPT], [SEED], negative_prompt=NEGATIVE, steps=3, guidance_scale=SCALE, height=64,
        width=64,
    )  # fmt: skip
    assert result.image.size == (64, 64)
    assert np.abs(_array(result.image) - expected).max() <= 2


def test_record_names_everything(ours, folders):
    (result,) = ours("sd1")(["a cat"], [7], steps=1, sampler="Euler a", height=16, width=16)
    r = result.record
    assert r["prompt"] == "a cat" and r["seed"] == 7 and r["steps"] == 1
    assert r["sampler"] == "euler_ancestral" and r["schedule"] == "default" and r["eta"] == 1.0
    assert (r["width"], r["height"], r["dtype"], r["device"]) == (16, 16, "fp32", "cpu")
    assert r["model"] == folders["sd1"].name and r["nan_retry_fp32"] is False
    assert r["model_hash"] == model_hash(folders["sd1"]) and len(r["model_hash"]) == 10
    assert r["ldm_version"]


def test_batch_equals_single_runs_for_ancestral_sampler(ours):
    pipe = ours("sd1")
    prompts, seeds = ["a red circle", "a blue square", "two green triangles"], [11, 12, 13]
    kwargs = dict(steps=4, sampler="euler_ancestral", height=32, width=32)
    batch = pipe(prompts, seeds, **kwargs)
    for prompt, seed, together in zip(prompts, seeds, batch):
        (alone,) = pipe([prompt], [seed], **kwargs)
        assert np.abs(_array(alone.image) - _array(together.image)).max() <= 1
    assert np.abs(_array(batch[0].image) - _array(batch[1].image)).max() > 10


def test_img2img_matches_diffusers(ours, theirs):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    expected = _diffusers_image(
        theirs("sd1", "StableDiffusionImg2ImgPipeline"), "EulerDiscreteScheduler", {},
        prompt=PROMPT, image=init, strength=0.6, num_inference_steps=STEPS,
    )  # fmt: skip
    (result,) = ours("sd1")(
        [PROMPT], [SEED], init_image=init, strength=0.6, steps=STEPS, sampler="euler"
    )
    assert result.record["mode"] == "img2img" and result.record["strength"] == 0.6
    assert np.abs(_array(result.image) - expected).max() <= 2


def test_nine_channel_inpainting_matches_diffusers(tmp_path, tiny_sd1):
    import shutil

    import diffusers

    # the tiny SD1 folder with a 9-channel U-Net: an inpainting checkpoint's layout
    folder = tmp_path / "inpaint"
    shutil.copytree(tiny_sd1, folder)
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")
    torch.manual_seed(1)
    inpaint_unet = diffusers.UNet2DConditionModel.from_config(unet.config, in_channels=9)
    inpaint_unet.save_pretrained(folder / "unet")
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    mask = Image.fromarray(mask)
    theirs = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    expected = _diffusers_image(
        theirs, "EulerDiscreteScheduler", {}, prompt=PROMPT, image=init, mask_image=mask,
        height=32, width=32, num_inference_steps=3,
    )  # fmt: skip
    pipe = load_pipeline(str(folder), device="cpu", dtype="fp32")
    assert pipe.is_inpainting_model
    (result,) = pipe(
        [PROMPT], [SEED], init_image=init, mask=mask, strength=1.0, steps=3, sampler="euler"
    )
    assert result.record["mode"] == "inpaint"
    assert np.abs(_array(result.image) - expected).max() <= 2
    with pytest.raises(LdmError, match="inpainting model"):
        pipe([PROMPT], [SEED], steps=1)


def test_inpaint_blending_keeps_known_latents(ours):
    """An all-black mask keeps everything: the prompt cannot change the image."""
    init = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), np.uint8))
    keep_all = Image.new("L", (32, 32), 0)
    pipe = ours("sd1")
    kwargs = dict(init_image=init, mask=keep_all, strength=1.0, steps=2, sampler="euler")
    (a,) = pipe(["a red circle"], [5], **kwargs)
    (b,) = pipe(["a blue square"], [5], **kwargs)
    assert np.abs(_array(a.image) - _array(b.image)).max() <= 1
    (c,) = pipe(["a red circle"], [5], **dict(kwargs, mask=Image.new("L", (32, 32), 255)))
    assert np.abs(_array(a.image) - _array(c.image)).max() > 10  # repainting changes it


def test_outpaint_canvas_pads_and_masks():
    from ldm.modes import outpaint_canvas, parse_outpaint

    image = Image.new("RGB", (20, 16), (200, 10, 10))
    canvas, mask = outpaint_canvas(image, parse_outpaint("8,3,0,0"), factor=8, overlap=4)
    assert canvas.size == (32, 16) and mask.size == (32, 16)  # 20 + 8 + 3 -> 32 (multiple of 8)
    m = np.asarray(mask)
    assert m[:, :8].min() == 255 and m[:, 8 + 20 :].min() == 255  # the new borders
    assert m[:, 12 : 8 + 16].max() == 0  # the old image minus the 4-pixel seam overlap
    with pytest.raises(LdmError, match="--outpaint"):
        parse_outpaint("1,2")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=15), "multiple of 2"),
        (dict(width=0), "positive"),
        (dict(steps=0), "--steps"),
        (dict(sampler="bogus"), "unknown sampler"),
        (dict(schedule="bogus"), "--schedule"),
        (dict(guidance_scale=float("nan")), "--guidance-scale"),
        (dict(init_image="/nonexistent.png"), "--init-image"),
        (dict(mask=Image.new("L", (16, 16))), "--mask needs --init-image"),
    ],
)
def test_bad_requests_are_one_line_errors(ours, kwargs, match):
    with pytest.raises(LdmError, match=match) as info:
        ours("sd1")(["x"], [0], **{"steps": 1, **kwargs})
    assert "\n" not in str(info.value)


def test_unet_nan_is_an_error_not_a_black_image(ours):
    pipe = ours("sd1")
    weight = pipe.unet.conv_out.bias
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.fill_(float("nan"))
        with pytest.raises(LdmError, match="NaN"):
            pipe(["x"], [0], steps=2, height=16, width=16)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_missing_model_is_a_checkpoint_error(tmp_path):
    with pytest.raises(LdmError, match="no such file"):
        load_pipeline(str(tmp_path / "nope"))


def test_nan_decode_is_redone_in_fp32_per_image(tiny_sd1):
    """bf16 on CPU; image 1's decode comes out NaN: only it is decoded again, in fp32."""
    import copy

    pipe = load_pipeline(str(tiny_sd1), device="cpu", dtype="bf16")
    pipe._vae_fp32 = copy.deepcopy(pipe.vae).float()  # made before the bf16 VAE is broken
    decode = pipe.vae.decode

    def broken(latents):
        out = decode(latents)
        assert latents.dtype == torch.bfloat16
        return out.index_fill(0, torch.tensor([1]), float("nan")) if len(out) > 1 else out

    pipe.vae.decode = broken
    results = pipe(["a", "b"], [3, 4], steps=2, height=16, width=16)
    assert [r.record["nan_retry_fp32"] for r in results] == [False, True]
    assert results[0].record["dtype"] == "bf16"
    assert _array(results[1].image).std() > 5  # a real picture, not black


def test_missing_demo_model_is_a_clear_error(monkeypatch, tmp_path):
    from ldm import pipeline

    monkeypatch.setattr(pipeline, "DEFAULT_MODEL", tmp_path / "shapes-demo")
    with pytest.raises(LdmError, match="bundled demo model is missing"):
        load_pipeline(None)


def test_encode_hook_and_steps_compose_the_call(ours):
    """The call = prepare -> encode (or the hook) -> denoise -> decode, and the hook is used."""
    pipe = ours("sd1")
    settings = dict(steps=2, sampler="dpmpp_2m_sde", height=16, width=16, negative_prompt="n")
    whole = pipe(["a", "b"], [1, 2], **settings)
    seen = []

    def encode(prompts, negatives, clip_skip, guided):
        seen.append((list(prompts), list(negatives), clip_skip, guided))
        return pipe.encode_text(prompts, negatives, clip_skip, guided)

    hooked = pipe(["a", "b"], [1, 2], encode=encode, **settings)
    assert seen == [(["a", "b"], ["n", "n"], 1, True)]
    request = pipe.prepare(["a", "b"], [1, 2], **settings)
    assert (request.spec.name, request.eta, request.mode) == ("dpmpp_2m_sde", 1.0, "txt2img")
    cond, uncond = pipe.encode_text(request.prompts, request.negatives, 1, True)
    images, _ = pipe.decode(pipe.denoise(request, cond, uncond))
    for a, b, c in zip(whole, hooked, images):
        assert np.array_equal(_array(a.image), _array(b.image))
        assert np.array_equal(_array(a.image), _array(c))


def test_unset_settings_come_from_the_model_family(ours):
    pipe = ours("sd1")
    defaults = pipe.sampling_defaults
    assert defaults == dict(sampler="dpmpp_2m", schedule="default", steps=20, guidance_scale=7.5)
    request = pipe.prepare(["a"], [0])
    assert (request.spec.name, request.schedule) == (defaults["sampler"], defaults["schedule"])
    assert (request.steps, request.guidance_scale) == (defaults["steps"], 7.5)
    assert pipe.prepare(["a"], [0], sampler="DPM++ 2M Karras").schedule == "karras"
    with pytest.raises(LdmError, match="--schedule"):
        pipe.prepare(["a"], [0], schedule="bogus")
