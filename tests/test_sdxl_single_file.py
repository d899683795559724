"""SDXL original single files (sgm / A1111 / ComfyUI layout) on tiny folders: load, save,
convert, metadata, image.

Independent routes: diffusers' own converters (``convert_ldm_unet_checkpoint``,
``convert_open_clip_checkpoint``, ...) read ldm's exports back to the diffusers folder's tensors;
diffusers' ``from_single_file`` loads them; a file's image is the folder's and diffusers'. The
full-size public layout and open_clip's bigG are in test_sdxl_single_file_layout.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_xl import BASE_PREFIXES, REFINER_PREFIX, _bare, make_xl

from ldm.errors import CheckpointError, ConfigError
from ldm.formats.diffusers_folder import load_folder
from ldm.formats.safe_load import load_state_dict, read_safetensors_header, save_state_dict
from ldm.formats.single_file import load_single_file, save_single_file, to_original_state_dict
from ldm.models import families


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("xl")
    return {"sdxl": make_xl(root / "base"), "sdxl-refiner": make_xl(root / "refiner", True, 1)}


@pytest.fixture(params=["sdxl", "sdxl-refiner"])
def xl(request, folders) -> tuple[str, Path]:
    return request.param, folders[request.param]


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _weights(folder: Path, part: str) -> dict:
    name = "model" if part.startswith("text") else "diffusion_pytorch_model"
    return load_state_dict(folder / part / f"{name}.safetensors")


def _diffusers_read(original: dict, folder: Path, family: str) -> dict[str, dict]:
    """diffusers' single-file converters applied to an original-keyed state dict."""
    import diffusers.loaders.single_file_utils as su
    from transformers import CLIPTextModelWithProjection

    config = json.loads((folder / "unet/config.json").read_text())
    vae_config = json.loads((folder / "vae/config.json").read_text())
    big_g = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
    prefix = BASE_PREFIXES[1] if family == "sdxl" else REFINER_PREFIX
    out = {
        "unet": su.convert_ldm_unet_checkpoint(dict(original), config),
        "vae": su.convert_ldm_vae_checkpoint(dict(original), vae_config),
        "text_encoder_2": su.convert_open_clip_checkpoint(big_g, dict(original), prefix),
    }
    if family == "sdxl":
        out["text_encoder"] = su.convert_ldm_clip_checkpoint(dict(original))
    return out


def test_export_is_what_diffusers_converters_read(xl):
    family, folder = xl
    original = to_original_state_dict(load_folder(folder))
    assert families.from_keys(original, "export").name == family
    for part, state in _diffusers_read(original, folder, family).items():
        _assert_same(_bare(state), _bare(_weights(folder, part)))
    assert any(k.startswith("model.diffusion_model.label_emb.0.2.") for k in original)
    prefix = BASE_PREFIXES[1] if family == "sdxl" else REFINER_PREFIX
    assert original[prefix + "text_projection"].shape == (48, 40)  # (width, proj): x @ P


def test_diffusers_from_single_file_loads_the_export(xl, tmp_path):
    """diffusers reads ldm's file (offline: the folder supplies the configs) as the folder."""
    import diffusers

    family, folder = xl
    path = save_single_file(load_folder(folder), tmp_path / "m.safetensors")
    cls = diffusers.StableDiffusionXLPipeline
    if family == "sdxl-refiner":
        cls = diffusers.StableDiffusionXLImg2ImgPipeline
    ref = cls.from_pretrained(folder)
    theirs = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(ref, part) is None:
            assert getattr(theirs, part) is None
            continue
        _assert_same(getattr(theirs, part).state_dict(), getattr(ref, part).state_dict())


def _random_original(folder: Path, seed: int = 1) -> dict:
    """Original-keyed weights with fresh random values (layout from an export)."""
    layout = to_original_state_dict(load_folder(folder))
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=g) if v.is_floating_point() and v.ndim else v
        for k, v in layout.items()
    }


def test_file_from_elsewhere_loads_and_saves_back_bit_exact(xl, tmp_path):
    """A file with no ldm metadata: ldm's modules hold what diffusers' converters read from it,
    and ldm writes the very same file back (keys, dtypes, values)."""
    family, folder = xl
    original = _random_original(folder)
    path = tmp_path / "plain.safetensors"
    save_state_dict(original, path)
    parts = load_single_file(path, config=folder)
    assert parts.family.name == family and "file metadata" not in str(parts.inferred)
    for part, state in _diffusers_read(original, folder, family).items():
        _assert_same(_bare(getattr(parts, part).state_dict()), _bare(state))
    assert (parts.text_encoder is None) == (family == "sdxl-refiner")
    assert parts.tokenizer_2.pad_token == "!"  # OpenCLIP pads with id 0
    save_single_file(parts, tmp_path / "back.safetensors")
    _assert_same(load_state_dict(tmp_path / "back.safetensors"), original)


def test_config_metadata_round_trip(xl, tmp_path):
    """ldm's export records every config; ldm reloads it with nothing guessed; without the
    metadata the keys are all there is (and the tiny head counts cannot be guessed)."""
    family, folder = xl
    parts = load_folder(folder)
    path = save_single_file(parts, tmp_path / "m.safetensors")
    stored = json.loads(read_safetensors_header(path)["__metadata__"]["ldm.config"])
    back = load_single_file(path)
    assert set(back.inferred) == {"family", "prediction_type"}
    assert back.unet.config == parts.unet.config and back.vae.config == parts.vae.config
    assert back.scheduler_config == parts.scheduler_config
    for name in ("text_encoder", "text_encoder_2"):
        ours, ref = getattr(back, name), getattr(parts, name)
        assert (name in stored) == (ref is not None)
        if ref is not None:
            ours_config, ref_config = (m.config.to_diff_dict() for m in (ours, ref))
            ours_config.pop("dtype", None), ref_config.pop("dtype", None)  # how it was loaded
            assert ours_config == ref_config, name
            assert type(ours) is type(ref)
    flags = {k: v for k, v in back.model_index.items() if k != "scheduler"}
    assert flags == {k: parts.model_index[k] for k in flags} and flags  # SDXL pipeline flags
    meta = read_safetensors_header(path)["__metadata__"]
    unreadable, other_family = (
        dict(meta, **{"ldm.config": "{x"}),
        dict(meta, **{"ldm.family": "sd1"}),
    )
    for broken in ({}, unreadable, other_family):  # metadata absent or not for these weights:
        save_state_dict(load_state_dict(path), tmp_path / "x.safetensors", broken or None)
        with pytest.raises(ConfigError, match="--config"):  # inferred from the keys
            load_single_file(tmp_path / "x.safetensors")
        (tmp_path / "x.safetensors").unlink()


def test_file_without_metadata_loads_from_its_keys_alone(tmp_path):
    """No metadata, no --config: every shape-given field is read from the keys (incl. bigG's
    projection width and the time-id sinusoid width inside label_emb), the rest is the SDXL
    default and said so; the weights are the folder's."""
    folder = make_xl(tmp_path / "f", inferable=True)
    ref = load_folder(folder)
    path = tmp_path / "plain.safetensors"
    save_state_dict(to_original_state_dict(ref), path)
    parts = load_single_file(path)
    assert parts.family.name == "sdxl"
    assert {"unet.attention_head_dim", "unet.sample_size"} <= set(parts.inferred)
    ours, true = parts.unet.config.to_diffusers(), ref.unet.config.to_diffusers()
    for key in ("block_out_channels", "attention_head_dim", "transformer_layers_per_block",
                "cross_attention_dim", "addition_time_embed_dim", "down_block_types",
                "projection_class_embeddings_input_dim", "layers_per_block"):  # fmt: skip
        assert ours[key] == true[key], key
    for name in ("text_encoder", "text_encoder_2"):
        ours, true = getattr(parts, name).config, getattr(ref, name).config
        keys = ["hidden_size", "num_attention_heads", "num_hidden_layers", "hidden_act",
                "intermediate_size"] + ["projection_dim"] * (name == "text_encoder_2")  # fmt: skip
        for key in keys:  # (CLIPTextModel has no projection: its projection_dim means nothing)
            assert getattr(ours, key) == getattr(true, key), (name, key)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same(
            _bare(getattr(parts, name).state_dict()), _bare(getattr(ref, name).state_dict())
        )
    assert parts.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert parts.vae.config.scaling_factor == 0.13025


def test_comfyui_v_prediction_markers(folders, tmp_path):
    """ComfyUI's empty ``v_pred`` / ``ztsnr`` keys (v-prediction SDXL fine-tunes) are read and
    written; EDM variants (Playground v2.5's ``edm_mean``) are refused by name."""
    folder = folders["sdxl"]
    configs = {p: json.loads((folder / p / "config.json").read_text())
               for p in ("unet", "vae", "text_encoder", "text_encoder_2")}  # fmt: skip
    original = to_original_state_dict(load_folder(folder))
    path = tmp_path / "vpred.safetensors"
    save_state_dict({**original, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, path)
    parts = load_single_file(path, config=configs)
    assert parts.prediction_type == "v_prediction" and "v_pred" in parts.inferred["prediction_type"]
    assert parts.scheduler_config["rescale_betas_zero_snr"] is True
    back = to_original_state_dict(parts)
    assert back["v_pred"].numel() == 0 and back["ztsnr"].numel() == 0
    assert "v_pred" not in original  # an epsilon model carries no marker
    save_state_dict({**original, "edm_mean": torch.zeros(4)}, tmp_path / "pg.safetensors")
    with pytest.raises(CheckpointError, match="Playground v2.5"):
        load_single_file(tmp_path / "pg.safetensors", config=configs)


def test_cli_convert_round_trips(xl, tmp_path, capsys):
    """folder -> single file -> folder -> single file: every tensor and flag comes back."""
    from ldm.cli import main

    family, folder = xl
    single, back, again = tmp_path / "m.safetensors", tmp_path / "back", tmp_path / "m2.safetensors"
    assert main(["convert", str(folder), str(single), "--to", "single-file"]) == 0
    assert main(["convert", str(single), str(back), "--to", "diffusers"]) == 0
    assert main(["convert", str(back), str(again), "--to", "single-file"]) == 0
    guessed = [line.split(":")[0] for line in capsys.readouterr().err.splitlines()]
    assert set(guessed) == {"inferred family", "inferred prediction_type"}  # nothing else
    parts = ["unet", "vae", "text_encoder_2"] + (["text_encoder"] if family == "sdxl" else [])
    for part in parts:
        _assert_same(_bare(_weights(back, part)), _bare(_weights(folder, part)))
        ours, ref = (json.loads((f / part / "config.json").read_text()) for f in (back, folder))
        for key in ("block_out_channels", "transformer_layers_per_block", "projection_dim",
                    "addition_time_embed_dim", "hidden_act", "num_hidden_layers"):  # fmt: skip
            assert ours.get(key) == ref.get(key) or list(ours.get(key)) == list(ref[key]), key
    index = json.loads((back / "model_index.json").read_text())
    ref = json.loads((folder / "model_index.json").read_text())
    for key in ("_class_name", "force_zeros_for_empty_prompt", "text_encoder", "tokenizer_2"):
        assert index.get(key) == ref.get(key), key
    _assert_same(load_state_dict(again), load_state_dict(single))


def test_single_file_gives_the_folders_image(folders, tmp_path):
    """txt2img from the single file = from the folder it came from (same weights, same image),
    and within 2/255 of diffusers' StableDiffusionXLPipeline on that folder."""
    import diffusers

    from ldm.pipeline import load_pipeline

    folder = folders["sdxl"]
    path = save_single_file(load_folder(folder), tmp_path / "m.safetensors")
    settings = dict(steps=3, sampler="euler", guidance_scale=5.0, width=32, height=32)
    images = []
    for model in (path, folder):
        (result,) = load_pipeline(str(model), "cpu", "fp32")(["a red circle"], [7], **settings)
        images.append(np.asarray(result.image, dtype=np.int16))
    assert np.array_equal(images[0], images[1])
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    out = theirs(
        "a red circle", num_inference_steps=3, guidance_scale=5.0, width=32, height=32,
        generator=torch.Generator().manual_seed(7), output_type="np",
    ).images[0]  # fmt: skip
    expected = np.round(out * 255).astype(np.int16)
    assert np.abs(images[0] - expected).max() <= 2


def test_incomplete_sdxl_file_is_one_line_error(folders, tmp_path):
    folder = folders["sdxl"]
    original = to_original_state_dict(load_folder(folder))
    texts = {p: json.loads((folder / p / "config.json").read_text())
             for p in ("text_encoder", "text_encoder_2")}  # fmt: skip
    width = original["model.diffusion_model.label_emb.0.0.weight"].shape[1]
    odd = {"model.diffusion_model.label_emb.0.0.weight": torch.zeros(64, width + 1)}
    cases = [  # (weights, config, words): the U-Net is inferred where the config leaves it out
        ({k: v for k, v in original.items() if not k.startswith(BASE_PREFIXES[0])}, folder, ""),
        ({k: v for k, v in original.items() if "label_emb" not in k}, folder, "missing"),
        ({**original, **odd}, texts, "6 time ids"),  # 40 pooled + 6 x 8: one too many
    ]
    for state_dict, config, words in cases:
        path = tmp_path / "broken.safetensors"
        save_state_dict(state_dict, path)
        with pytest.raises((CheckpointError, ConfigError)) as e:
            load_single_file(path, config=config)
        assert "\n" not in str(e.value) and str(path) in str(e.value) and words in str(e.value)
        path.unlink()
