"""FLUX.1 single files through ldm's front door: ``ldm txt2img --model flux.safetensors`` (the
file detected by its ``double_blocks`` keys, loaded by ldm.formats.original_flux) draws the image
of the diffusers folder it was saved from; LoRA names and the trainer's LoRA export tell FLUX
from SD3 (both transformers have joint_attention_dim)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tiny_flux import tiny_flux_dev, tiny_flux_schnell  # noqa: F401 (fixtures)

from ldm.errors import ConfigError
from ldm.formats.diffusers_folder import load_folder
from ldm.formats.lora_names import is_sd3
from ldm.formats.safe_load import read_safetensors_header
from ldm.formats.single_file import load_single_file, save_single_file
from ldm.models import families


def _txt2img(model, out, *extra) -> np.ndarray:
    from ldm.cli import main

    args = ["txt2img", "--model", str(model), "--prompt", "a red circle", "--steps", "2",
            "--H", "32", "--W", "32", "--seed", "4", "--outdir", str(out), *extra]  # fmt: skip
    assert main(args) == 0
    (png,) = out.glob("*.png")
    return np.asarray(Image.open(png), dtype=np.int16)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_txt2img_on_a_flux_single_file_draws_the_folders_image(
    variant,
    tiny_flux_dev,  # noqa: F811
    tiny_flux_schnell,  # noqa: F811
    tmp_path,
):
    folder = tiny_flux_dev if variant == "dev" else tiny_flux_schnell
    path = save_single_file(load_folder(folder), tmp_path / "flux.safetensors")
    header = read_safetensors_header(path)
    assert any(k.startswith("model.diffusion_model.double_blocks.") for k in header)
    assert "ldm.tokenizer_2" in header["__metadata__"]  # the T5 tokenizer travels with it
    parts = load_single_file(path)
    assert parts.family.name == "flux"
    assert parts.family.steps == (28 if variant == "dev" else 4)  # for_network: schnell's own
    want = _txt2img(folder, tmp_path / "folder")
    got = _txt2img(path, tmp_path / "file")
    assert np.abs(want - got).max() == 0


def test_flux_file_refuses_a_prediction_type(tiny_flux_dev, tmp_path):  # noqa: F811
    path = save_single_file(load_folder(tiny_flux_dev), tmp_path / "flux.safetensors")
    with pytest.raises(ConfigError, match="FLUX.1 is a flow model"):
        load_single_file(path, prediction_type="epsilon")


def test_flux_is_detected_and_not_taken_for_sd3(tiny_flux_dev):  # noqa: F811
    for key in ("double_blocks.0.img_attn.qkv.weight",
                "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"):  # fmt: skip
        assert families.from_keys([key], "f").name == "flux"
    parts = load_folder(tiny_flux_dev)
    assert not is_sd3(parts.unet.config)
    assert is_sd3({"joint_attention_dim": 4096, "caption_projection_dim": 1536})


def test_trainer_lora_export_of_flux_is_transformer_keyed(tiny_flux_dev, tmp_path):  # noqa: F811
    from ldm.formats.safe_load import load_state_dict
    from ldm.train.config import LoRAConfig
    from ldm.train.lora import add_lora, save_lora

    parts = load_folder(tiny_flux_dev)
    add_lora(parts.unet, "unet", LoRAConfig(rank=2, alpha=2.0))
    diffusers_file, kohya_file = save_lora(parts, tmp_path / "lora")
    keys = set(load_state_dict(diffusers_file))
    assert keys and all(k.startswith("transformer.") for k in keys), sorted(keys)[:3]
    kohya = set(load_state_dict(kohya_file))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya


def test_models_listing_shows_schnells_own_defaults(tiny_flux_dev, tiny_flux_schnell):  # noqa: F811
    """``ldm models`` (bundled.sampling_defaults) reads the transformer config, as load_folder."""
    from ldm.models.bundled import sampling_defaults

    schnell = sampling_defaults(tiny_flux_schnell, {})
    assert (schnell["steps"], schnell["guidance_scale"]) == (4, 1.0)
    dev = sampling_defaults(tiny_flux_dev, {})
    assert (dev["steps"], dev["guidance_scale"]) == (28, 3.5)


def test_batch_true_cfg_scale_equals_the_pipeline(tiny_flux_dev, tmp_path):  # noqa: F811
    """``ldm batch --true-cfg-scale`` (as txt2img's) reaches the pipeline and its record."""
    from ldm.cli import main
    from ldm.infotext import read_png_metadata
    from ldm.pipeline import load_pipeline

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "out"
    assert main(["batch", "--prompts", str(prompts), "--model", str(tiny_flux_dev), "--outdir",
                 str(out), "--steps", "2", "--H", "32", "--W", "32", "--negative-prompt",
                 "blurry", "--true-cfg-scale", "3", "--no-progress"]) == 0  # fmt: skip
    (png,) = out.glob("*.png")
    assert read_png_metadata(png)[1]["true_cfg_scale"] == 3.0
    made = np.asarray(Image.open(png), dtype=np.int16)
    kw = dict(negative_prompt="blurry", steps=2, height=32, width=32)
    (want,) = load_pipeline(tiny_flux_dev)(["a red circle"], [0], true_cfg_scale=3.0, **kw)
    (plain,) = load_pipeline(tiny_flux_dev)(["a red circle"], [0], **kw)
    assert np.abs(made - np.asarray(want.image, dtype=np.int16)).max() == 0
    assert np.abs(made - np.asarray(plain.image, dtype=np.int16)).max() > 2


def test_batch_signature_covers_t5_settings(tmp_path):
    """Joining / resuming runs must agree on --no-t5 and --max-sequence-length."""
    from argparse import Namespace
    from dataclasses import make_dataclass
    from types import SimpleNamespace

    from ldm.cli.batch import _signature

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    pipe = SimpleNamespace(model_hash="abc", loras=[], dtype="fp32", max_sequence_length=512)
    args = Namespace(prompts=str(prompts), batch_size=4, no_t5=False)
    spec = make_dataclass("Spec", [])()  # the job spec (dataclasses.asdict)
    base = _signature(args, spec, pipe)
    assert _signature(Namespace(**{**vars(args), "no_t5": True}), spec, pipe) != base
    shorter = SimpleNamespace(**{**vars(pipe), "max_sequence_length": 256})
    assert _signature(args, spec, shorter) != base
    assert _signature(args, spec, pipe) == base


def test_infotext_writes_and_reads_forges_distilled_cfg_scale(tiny_flux_dev, tmp_path):  # noqa: F811
    """FLUX.1-dev's embedded scale as Forge writes it ("Distilled CFG Scale"; "CFG scale" is true
    CFG, 1 = off); --from-png of the A1111 text alone (no ldm record) makes the same image."""
    from ldm.infotext import format_infotext, parse_infotext, save_png

    flags = ["--negative-prompt", "blurry", "--true-cfg-scale", "3"]
    made = _txt2img(tiny_flux_dev, tmp_path / "a", *flags)
    (png,) = (tmp_path / "a").glob("*.png")
    text = Image.open(png).info["parameters"]
    assert "CFG scale: 3, Distilled CFG Scale: 3.5" in text and "Schedule type: Simple" in text
    bare = tmp_path / "bare.png"
    save_png(Image.open(png), bare, text)  # the A1111 text only
    again = tmp_path / "b"
    from ldm.cli import main

    assert main(["txt2img", "--from-png", str(bare), "--model", str(tiny_flux_dev),
                 "--outdir", str(again)]) == 0  # fmt: skip
    (png2,) = again.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png2), dtype=np.int16), made)
    # a flow model's default schedule has one label whatever the sampler (and reads back)
    params = dict(prompt="a", steps=4, schedule="default", guidance_scale=3.5, seed=1,
                  width=32, height=32, flow=True)  # fmt: skip
    for sampler in ("euler", "dpmpp_2m", "unipc"):
        text = format_infotext(dict(params, sampler=sampler))
        assert "Schedule type: Simple, Schedule spacing: diffusers" in text
        assert parse_infotext(text)["schedule"] == "default"
