"""FLUX.1 end to end: ldm's pipeline against diffusers' FluxPipeline (Img2Img, Inpaint) on
tiny random FLUX-shaped folders (tests/tiny_flux.py), dev-style (embedded guidance, dynamic
shift) and schnell-style (no guidance embedding); true CFG; folders ldm saves load in diffusers;
the family's defaults; bf16 on the CPU; what is refused."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_flux import tiny_flux_dev, tiny_flux_schnell  # noqa: F401 (fixtures)

from ldm.errors import LdmError
from ldm.formats.diffusers_folder import load_folder, save_folder
from ldm.formats.safe_load import load_state_dict
from ldm.infotext import read_png_metadata
from ldm.loading import load_model
from ldm.pipeline import load_pipeline

SETTINGS = dict(steps=3, height=64, width=48)


def diffusers_image(folder, cls="FluxPipeline", seed=1, **kwargs):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    s = dict(SETTINGS, **kwargs)
    out = pipe(num_inference_steps=s.pop("steps"), generator=torch.Generator().manual_seed(seed),
               **s)  # fmt: skip
    return np.asarray(out.images[0], dtype=np.int16)


def ldm_image(folder, seed=1, calls=None, **kwargs):
    """ldm's image and record; ``calls`` collects the batch size of every transformer call."""
    pipe = load_pipeline(folder)
    if calls is not None:
        pipe.unet.register_forward_hook(lambda m, args, out: calls.append(len(out)))
    (out,) = pipe([kwargs.pop("prompt")], [seed], **{**SETTINGS, **kwargs})
    return np.asarray(out.image, dtype=np.int16), out.record


def assert_close(a, b, tol=2):
    diff = np.abs(a - b).max()
    assert diff <= tol, f"max pixel difference {diff}/255"


def test_dev_embedded_guidance_equals_diffusers(tiny_flux_dev):  # noqa: F811
    calls = []
    ours, record = ldm_image(tiny_flux_dev, calls=calls, prompt="a red circle", guidance_scale=3.5)
    assert_close(ours, diffusers_image(tiny_flux_dev, prompt="a red circle", guidance_scale=3.5))
    assert calls == [1, 1, 1]  # one conditioned pass per step, no unconditioned one
    assert record["guidance_scale"] == 3.5 and record["sampler"] == "euler"
    other, _ = ldm_image(tiny_flux_dev, prompt="a red circle", guidance_scale=1.5)
    assert np.abs(ours - other).max() > 2  # the embedded scale mattered


def test_schnell_defaults_equal_diffusers(tiny_flux_schnell):  # noqa: F811
    calls = []
    ours, record = ldm_image(
        tiny_flux_schnell, calls=calls, prompt="a blue square", steps=None, height=32, width=32
    )
    theirs = diffusers_image(tiny_flux_schnell, prompt="a blue square", steps=4, height=32,
                             width=32, guidance_scale=0.0, max_sequence_length=256)  # fmt: skip
    assert_close(ours, theirs)
    assert record["steps"] == 4 and record["guidance_scale"] == 1.0 and calls == [1] * 4


def test_true_cfg_equals_diffusers(tiny_flux_dev):  # noqa: F811
    kw = dict(prompt="a yellow triangle", negative_prompt="blurry")
    calls = []
    ours, record = ldm_image(tiny_flux_dev, calls=calls, true_cfg_scale=4.0, **kw)
    theirs = diffusers_image(tiny_flux_dev, true_cfg_scale=4.0, guidance_scale=3.5, **kw)
    assert_close(ours, theirs)
    assert calls == [2, 2, 2] and record["true_cfg_scale"] == 4.0  # cond and uncond batched


def test_schnell_guidance_scale_is_diffusers_true_cfg(tiny_flux_schnell):  # noqa: F811
    """Without an embedded scale, --guidance-scale is plain CFG: diffusers' true_cfg_scale."""
    kw = dict(prompt="two circles", negative_prompt="a square")
    ours, _ = ldm_image(tiny_flux_schnell, guidance_scale=3.0, **kw)
    theirs = diffusers_image(tiny_flux_schnell, true_cfg_scale=3.0, max_sequence_length=256, **kw)
    assert_close(ours, theirs)


def test_img2img_equals_diffusers(tiny_flux_dev):  # noqa: F811
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 48, 3), np.uint8))
    kw = dict(prompt="a purple square", strength=0.7, steps=4, guidance_scale=3.5)
    ours, record = ldm_image(tiny_flux_dev, init_image=init, **kw)
    theirs = diffusers_image(tiny_flux_dev, "FluxImg2ImgPipeline", image=init, **kw)
    assert_close(ours, theirs)
    assert record["mode"] == "img2img" and record["strength"] == 0.7


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_by_latent_blending_equals_diffusers(tiny_flux_dev, strength):  # noqa: F811
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[12:44, 20:60] = 255  # white: repaint
    mask = Image.fromarray(mask)
    kw = dict(prompt="a red circle", strength=strength, steps=4, height=64, width=64)
    ours, record = ldm_image(tiny_flux_dev, init_image=init, mask=mask, **kw)
    theirs = diffusers_image(tiny_flux_dev, "FluxInpaintPipeline", image=init, mask_image=mask,
                             guidance_scale=3.5, **kw)  # fmt: skip
    assert_close(ours, theirs)
    assert record["mode"] == "inpaint"


def test_saved_folder_loads_in_diffusers_and_gives_the_same_image(tiny_flux_dev, tmp_path):  # noqa: F811
    saved = save_folder(load_folder(tiny_flux_dev), tmp_path / "saved")
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and "unet" not in index
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    kw = dict(prompt="two squares", guidance_scale=3.5)
    assert_close(diffusers_image(saved, **kw), diffusers_image(tiny_flux_dev, **kw), tol=0)


def test_family_tells_dev_from_schnell(tiny_flux_dev, tiny_flux_schnell):  # noqa: F811
    dev, schnell = load_pipeline(tiny_flux_dev), load_pipeline(tiny_flux_schnell)
    assert dev.parts.family.name == schnell.parts.family.name == "flux"
    assert dev.sampling_defaults == dict(sampler="euler", schedule="default", steps=28,
                                         guidance_scale=3.5)  # fmt: skip
    assert schnell.sampling_defaults["steps"] == 4
    assert schnell.sampling_defaults["guidance_scale"] == 1.0
    assert (dev.max_sequence_length, schnell.max_sequence_length) == (512, 256)
    assert dev.guidance_embedded and not schnell.guidance_embedded
    assert dev.default_size == (128 * dev.factor, 128 * dev.factor)  # FluxPipeline's 128 latents


def test_bf16_loads_the_files_weights_once_and_generates(tiny_flux_dev):  # noqa: F811
    parts = load_model(tiny_flux_dev, "cpu", "bf16")
    stored = load_state_dict(tiny_flux_dev / "transformer" / "diffusion_pytorch_model.safetensors")
    state = parts.unet.state_dict()
    assert set(state) == set(stored)
    for key, value in stored.items():
        assert state[key].dtype == torch.bfloat16 and torch.equal(state[key], value.bfloat16()), key
    for module in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
        assert not any(t.is_meta for t in module.state_dict().values())
    pipe = load_pipeline(tiny_flux_dev, dtype="bf16")
    (out,) = pipe(["a red circle"], [1], steps=2, height=32, width=32)
    assert out.record["dtype"] == "bf16" and np.asarray(out.image).std() > 0


def test_sizes_round_to_16_pixel_multiples_and_refusals(tiny_flux_dev, tiny_flux_schnell):  # noqa: F811
    pipe = load_pipeline(tiny_flux_dev)
    m = 2 * pipe.factor  # 2x2 latent patches: multiples of 2 x the VAE factor (FLUX: 16 px)
    request = pipe.prepare(["x"], [1], height=10 * m + m - 1, width=9 * m + 1)
    assert (request.height, request.width) == (10 * m, 9 * m)
    with pytest.raises(LdmError, match="--height must be an integer >= "):
        pipe.prepare(["x"], [1], height=m - 1, width=32)
    with pytest.raises(LdmError, match="--shift: this model shifts its schedule by image size"):
        pipe.prepare(["x"], [1], shift=3.0)
    assert "shift" not in pipe.prepare(["x"], [1]).settings()  # the config's 3.0 is unused
    with pytest.raises(LdmError, match="--true-cfg-scale applies to guidance-distilled"):
        load_pipeline(tiny_flux_schnell).prepare(["x"], [1], true_cfg_scale=3.0)


def test_a_batch_equals_its_images_one_by_one(tiny_flux_dev):  # noqa: F811
    pipe = load_pipeline(tiny_flux_dev)
    kw = dict(steps=2, height=32, width=32, negative_prompt="blurry", true_cfg_scale=2.0)
    both = pipe(["a red circle", "a blue square"], [5, 6], **kw)
    for out, prompt, seed in zip(both, ["a red circle", "a blue square"], [5, 6]):
        (alone,) = pipe([prompt], [seed], **kw)
        assert_close(np.asarray(out.image, np.int16), np.asarray(alone.image, np.int16), tol=1)


def test_cli_txt2img_and_from_png(tiny_flux_dev, tmp_path):  # noqa: F811
    from ldm.cli import main

    args = ["txt2img", "--model", str(tiny_flux_dev), "--prompt", "a red circle", "--steps", "2",
            "--H", "32", "--W", "32", "--seed", "4", "--outdir", str(tmp_path / "a")]  # fmt: skip
    assert main(args) == 0
    (png,) = (tmp_path / "a").glob("*.png")
    assert "Shift" not in Image.open(png).info["parameters"]  # FLUX.1-dev shifts by size
    again = ["txt2img", "--from-png", str(png), "--model", str(tiny_flux_dev),
             "--outdir", str(tmp_path / "b")]  # fmt: skip
    assert main(again) == 0
    (png2,) = (tmp_path / "b").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(png2)))
    cfg = ["--negative-prompt", "blurry", "--true-cfg-scale", "3", "--outdir", str(tmp_path / "c")]
    assert main([*args[:-2], *cfg]) == 0
    (png3,) = (tmp_path / "c").glob("*.png")
    assert read_png_metadata(png3)[1]["true_cfg_scale"] == 3.0
    kw = dict(prompt="a red circle", negative_prompt="blurry", steps=2, height=32, width=32)
    ours = ldm_image(tiny_flux_dev, seed=4, true_cfg_scale=3.0, **kw)[0]
    assert_close(np.asarray(Image.open(png3), np.int16), ours, tol=0)
    assert main(["txt2img", "--from-png", str(png3), "--model", str(tiny_flux_dev),
                 "--outdir", str(tmp_path / "d")]) == 0  # fmt: skip
    (png4,) = (tmp_path / "d").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png3)), np.asarray(Image.open(png4)))


@pytest.mark.parametrize("size", [(64, 48), (512, 768)])
def test_sigmas_are_flux_pipelines_with_the_dynamic_shift(tiny_flux_dev, size):  # noqa: F811
    """mu from the packed token count (H / f / 2)(W / f / 2), FluxPipeline's linspace sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from ldm.sampling.plan import make_denoiser, request_sigmas

    pipe = load_pipeline(tiny_flux_dev)
    r = pipe.prepare(["x"], [1], steps=7, height=size[0], width=size[1])
    tokens = (size[0] // pipe.factor // 2) * (size[1] // pipe.factor // 2)
    assert pipe.image_seq_len(r) == tokens
    family = pipe.parts.family
    denoiser = make_denoiser(pipe.unet, pipe.schedule, r, family=family)
    ours = request_sigmas(r, denoiser, None, pipe.parts.scheduler_config, tokens, family)
    config = pipe.parts.scheduler_config
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 7, 7), mu=calculate_shift(
        tokens, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
        config["max_shift"]))  # fmt: skip
    torch.testing.assert_close(ours, scheduler.sigmas.float(), atol=1e-6, rtol=0)


def test_no_t5_is_refused_for_flux(tiny_flux_schnell):  # noqa: F811
    """FLUX's context is T5's: leaving it out is an error, not a silently ignored flag."""
    with pytest.raises(LdmError, match="needs its T5 encoder"):
        load_folder(tiny_flux_schnell, t5=False)
