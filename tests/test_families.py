"""The model family registry: detection from folders and files, and what loading records."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ldm.errors import CheckpointError
from ldm.formats.diffusers_folder import load_folder, save_folder
from ldm.loading import load_model
from ldm.models import families
from ldm.models.build import NETWORKS, TEXT_MODELS


def test_registry_entries_are_complete():
    for name, family in families.FAMILIES.items():
        assert family.name == name
        assert family.network in NETWORKS
        assert family.text_encoders and family.prediction_type
        assert {family.network_folder, "vae", "scheduler"} <= set(family.single_file)
        assert {s.subfolder for s in family.text_encoders} <= set(family.single_file)
    assert set(families.KNOWN_ELSEWHERE).isdisjoint(
        f.pipeline_class for f in families.FAMILIES.values()
    )
    assert "CLIPTextModel" in TEXT_MODELS


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl", "sdxl-refiner"])
def test_folder_family_is_detected_and_survives_a_round_trip(kind, request, tmp_path):
    fixture = {"sd1": "tiny_sd1", "sd2": "tiny_sd2", "sdxl": "tiny_sdxl"}.get(
        kind, "tiny_sdxl_refiner"
    )
    folder = request.getfixturevalue(fixture)
    parts = load_folder(folder)
    assert parts.family is families.get(kind)
    saved = save_folder(parts, tmp_path / "copy")
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == parts.family.pipeline_class
    assert load_folder(saved).family is parts.family
    for spec, model, _ in parts.text_modules():  # every encoder saved, bit for bit
        again = getattr(load_folder(saved), spec.subfolder)
        assert type(again) is type(model)
        for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
            assert torch.equal(a, b), k


def test_sdxl_folders_load_in_diffusers_after_ldm_saves_them(
    tiny_sdxl, tiny_sdxl_refiner, tmp_path
):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = save_folder(load_folder(tiny_sdxl), tmp_path / "base")
    refiner = save_folder(load_folder(tiny_sdxl_refiner), tmp_path / "refiner")
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    assert pipe.config.force_zeros_for_empty_prompt
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner)
    assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score


def test_loaded_weights_are_the_files_own(tiny_sd1):
    """Modules built empty (meta device / no init) end up holding exactly the stored weights."""
    from ldm.formats.safe_load import load_state_dict

    parts = load_model(tiny_sd1, "cpu", "bf16")
    stored = load_state_dict(tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors")
    state = parts.unet.state_dict()
    assert set(state) == set(stored)
    for key, value in stored.items():
        assert state[key].dtype == torch.bfloat16 and state[key].device.type == "cpu"
        assert torch.equal(state[key], value.to(torch.bfloat16)), key
    for module in (parts.unet, parts.vae, parts.text_encoder):
        assert not any(t.is_meta for t in module.state_dict().values())
        assert not any(b.is_meta for b in module.buffers())


@pytest.mark.parametrize(
    "pipeline_class, words",
    [
        ("FluxFillPipeline", "FLUX.1 Fill models are not supported"),
        ("KandinskyPipeline", "pipeline class 'KandinskyPipeline' is not one ldm loads"),
    ],
)
def test_other_families_are_named(pipeline_class, words, tiny_sd1, tmp_path):
    folder = shutil.copytree(tiny_sd1, tmp_path / "other")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline_class}))
    with pytest.raises(CheckpointError, match=words):
        load_model(folder)


def test_a_folder_takes_no_single_file_config(tiny_sd1):
    from ldm.errors import LdmError

    with pytest.raises(LdmError, match="--config applies to a single file"):
        load_model(tiny_sd1, config={"unet": {}})
