"""SD3 end to end: ldm's pipeline against diffusers' StableDiffusion3Pipeline (and Img2Img) on
tiny random SD3-shaped folders (tests/tiny_sd3.py), with and without T5, SD3-medium- and
3.5-medium-shaped; folders ldm saves load in diffusers; flow-invalid samplers are refused."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sd3 import make_tiny_sd3, tiny_sd3, tiny_sd3_no_t5  # noqa: F401 (fixtures)

from ldm.cli import main
from ldm.errors import LdmError
from ldm.formats.diffusers_folder import load_folder, save_folder
from ldm.infotext import read_png_metadata
from ldm.pipeline import load_pipeline

SETTINGS = dict(steps=4, guidance_scale=5.0, height=64, width=48)


def diffusers_image(folder, cls="StableDiffusion3Pipeline", t5=True, seed=1, **kwargs):
    import diffusers

    missing = {} if t5 else dict(text_encoder_3=None, tokenizer_3=None)
    pipe = getattr(diffusers, cls).from_pretrained(folder, **missing)
    pipe.set_progress_bar_config(disable=True)
    s = dict(SETTINGS, **kwargs)
    out = pipe(num_inference_steps=s.pop("steps"), generator=torch.Generator().manual_seed(seed),
               **s)  # fmt: skip
    return np.asarray(out.images[0], dtype=np.int16)


def ldm_image(folder, t5=True, seed=1, **kwargs):
    pipe = load_pipeline(folder, t5=t5)
    prompt = kwargs.pop("prompt")
    (out,) = pipe([prompt], [seed], **{**SETTINGS, **kwargs})
    return np.asarray(out.image, dtype=np.int16), out.record


def assert_close(a, b, tol=2):
    diff = np.abs(a - b).max()
    assert diff <= tol, f"max pixel difference {diff}/255"


@pytest.mark.parametrize("t5", [True, False])
def test_txt2img_equals_diffusers(tiny_sd3, tiny_sd3_no_t5, t5):  # noqa: F811
    folder = tiny_sd3 if t5 else tiny_sd3_no_t5
    kw = dict(prompt="a red circle left of a blue square", negative_prompt="blurry")
    ours, record = ldm_image(folder, **kw)
    assert_close(ours, diffusers_image(folder, t5=t5, **kw))
    assert record["sampler"] == "euler" and record["steps"] == 4


def test_t5_can_be_left_out_of_a_folder_that_has_it(tiny_sd3):  # noqa: F811
    kw = dict(prompt="three green circles", negative_prompt="")
    ours, _ = ldm_image(tiny_sd3, t5=False, **kw)
    assert_close(ours, diffusers_image(tiny_sd3, t5=False, **kw))
    assert np.abs(ours - ldm_image(tiny_sd3, **kw)[0]).max() > 2  # T5 mattered


def test_sd35_medium_shape_equals_diffusers(tmp_path):
    shape = dict(dual_attention_layers=(0,), qk_norm="rms_norm")
    folder = make_tiny_sd3(tmp_path / "sd35", transformer=shape, seed=3)
    kw = dict(prompt="a yellow triangle", negative_prompt="a square")
    assert_close(ldm_image(folder, **kw)[0], diffusers_image(folder, **kw))


def test_img2img_flow_strength_equals_diffusers(tiny_sd3, tmp_path):  # noqa: F811
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 48, 3), np.uint8))
    kw = dict(prompt="a purple square", negative_prompt="", strength=0.7, steps=5)
    ours, record = ldm_image(tiny_sd3, init_image=init, **kw)
    theirs = diffusers_image(tiny_sd3, "StableDiffusion3Img2ImgPipeline", image=init, **kw)
    assert_close(ours, theirs)
    assert record["strength"] == 0.7


def test_saved_folder_loads_in_diffusers_and_gives_the_same_image(tiny_sd3, tmp_path):  # noqa: F811
    saved = save_folder(load_folder(tiny_sd3), tmp_path / "saved")
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and "unet" not in index
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    kw = dict(prompt="two squares", negative_prompt="")
    assert_close(diffusers_image(saved, **kw), diffusers_image(tiny_sd3, **kw), tol=0)


def test_flow_samplers_run_and_others_are_refused(tiny_sd3):  # noqa: F811
    pipe = load_pipeline(tiny_sd3)
    for sampler in ("heun", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde"):
        (out,) = pipe(["a circle"], [2], sampler=sampler, steps=3, height=32, width=32)
        assert np.isfinite(np.asarray(out.image, dtype=float)).all()
    with pytest.raises(LdmError, match="does not run on flow models"):
        pipe(["a circle"], [2], sampler="ddim", steps=3, height=32, width=32)


def test_cli_txt2img_and_from_png(tiny_sd3, tmp_path, capsys):  # noqa: F811
    args = ["txt2img", "--model", str(tiny_sd3), "--prompt", "a red circle", "--steps", "3",
            "--H", "32", "--W", "32", "--seed", "4", "--outdir", str(tmp_path / "a")]  # fmt: skip
    assert main(args) == 0
    (png,) = (tmp_path / "a").glob("*.png")
    text = Image.open(png).info["parameters"]
    assert "Sampler: Euler" in text and "Shift: 3" in text  # the checkpoint's shift
    again = ["txt2img", "--from-png", str(png), "--model", str(tiny_sd3),
             "--outdir", str(tmp_path / "b")]  # fmt: skip
    assert main(again) == 0
    (png2,) = (tmp_path / "b").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(png2)))
    assert main([*args[:-1], str(tmp_path / "c"), "--sampler", "ddim"]) == 2
    assert "does not run on flow models" in capsys.readouterr().err


def test_skip_layer_guidance_equals_diffusers(tmp_path):
    shape = dict(dual_attention_layers=(0,), qk_norm="rms_norm", num_layers=3)
    folder = make_tiny_sd3(tmp_path / "sd35", transformer=shape, seed=5)
    kw = dict(prompt="a blue circle", negative_prompt="", steps=10)
    slg = dict(skip_layer_scale=2.8, skip_layer_start=0.01, skip_layer_stop=0.5)
    ours, record = ldm_image(folder, skip_layers=[1], **slg, **kw)
    theirs = diffusers_image(
        folder, skip_guidance_layers=[1], skip_layer_guidance_scale=2.8,
        skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.5, **kw,
    )  # fmt: skip
    assert_close(ours, theirs)
    assert record["skip_layers"] == [1]
    assert np.abs(ours - ldm_image(folder, **kw)[0]).max() > 2  # it changed the image
    with pytest.raises(LdmError, match="blocks are 0..2"):
        ldm_image(folder, skip_layers=[3], **kw)


def test_cli_sd3_flags(tiny_sd3, tmp_path, capsys):  # noqa: F811
    base = ["txt2img", "--model", str(tiny_sd3), "--prompt", "a red circle", "--steps", "10",
            "--H", "32", "--W", "32", "--seed", "4"]  # fmt: skip
    slg = ["--skip-layers", "1", "--skip-layer-stop", "0.5"]
    assert main([*base, "--no-t5", *slg, "--outdir", str(tmp_path / "a")]) == 0
    (png,) = (tmp_path / "a").glob("*.png")
    record = read_png_metadata(png)[1]
    assert record["skip_layers"] == [1] and record["skip_layer_stop"] == 0.5
    ours = np.asarray(Image.open(png), dtype=np.int16)
    again = ldm_image(
        tiny_sd3, t5=False, seed=4, prompt="a red circle", steps=10, height=32, width=32,
        skip_layers=[1], skip_layer_stop=0.5, guidance_scale=7.0,
    )[0]  # fmt: skip
    assert_close(ours, again, tol=0)
    assert main([*base, "--max-sequence-length", "513", "--outdir", str(tmp_path / "b")]) == 2
    assert "--max-sequence-length 513" in capsys.readouterr().err


def test_shift_overrides_the_checkpoint_and_reads_back(tiny_sd3, tiny_sd1, tmp_path, capsys):  # noqa: F811
    kw = dict(prompt="a red circle", negative_prompt="")
    ours = ldm_image(tiny_sd3, shift=1.0, **kw)
    theirs = diffusers_image_with_shift(tiny_sd3, 1.0, **kw)
    assert_close(ours[0], theirs)
    assert ours[1]["shift"] == 1.0
    from ldm.infotext import format_infotext, parse_infotext

    assert parse_infotext(format_infotext(ours[1]))["shift"] == 1.0
    args = ["txt2img", "--model", str(tiny_sd1), "--prompt", "x", "--shift", "2",
            "--outdir", str(tmp_path)]  # fmt: skip
    assert main(args) == 2 and "--shift applies to flow models" in capsys.readouterr().err


def diffusers_image_with_shift(folder, shift, **kwargs):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
    pipe.set_progress_bar_config(disable=True)
    s = dict(SETTINGS, **kwargs)
    out = pipe(num_inference_steps=s.pop("steps"), generator=torch.Generator().manual_seed(1), **s)
    return np.asarray(out.images[0], dtype=np.int16)
