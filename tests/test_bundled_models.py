"""Models by name (ldm.models.bundled): resolution, ldm_model.json manifests, `ldm models`, and a
LoRA-on-base model that generates with its stored defaults through every entry point."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import main
from ldm.errors import CheckpointError
from ldm.infotext import read_png_metadata
from ldm.models import bundled

STORED = {"sampler": "euler", "steps": 3, "guidance_scale": 1.0}  # a few-step model's defaults
SIZE = ["--H", "32", "--W", "32"]


@pytest.fixture(scope="module")
def assets(tiny_sd1, tmp_path_factory):
    """A bundled-models folder: "tiny" (a model) and "tiny-lora" (a LoRA on it, as
    shapes-demo-lcm on shapes-demo), plus the LoRA's kohya file outside it."""
    from ldm.formats.diffusers_folder import load_folder
    from ldm.train.config import LoRAConfig
    from ldm.train.lora import add_lora, save_lora

    root = tmp_path_factory.mktemp("assets")
    shutil.copytree(tiny_sd1, root / "tiny")
    parts = load_folder(tiny_sd1)
    add_lora(parts.unet, "unet", LoRAConfig(rank=4, alpha=4.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in parts.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a LoRA that really changes the image
    _, kohya = save_lora(parts, tmp_path_factory.mktemp("lora"))
    folder = root / "tiny-lora"
    folder.mkdir()
    shutil.copy(kohya, folder / "lora.safetensors")
    manifest = {"kind": "lora", "base": "tiny", "lora": "lora.safetensors", "lora_scale": 1.0,
                "defaults": STORED, "description": "tiny, distilled"}  # fmt: skip
    (folder / bundled.MANIFEST).write_text(json.dumps(manifest))
    return root, kohya


@pytest.fixture
def names(assets, monkeypatch):
    monkeypatch.setattr(bundled, "BUNDLED_DIR", assets[0])
    return assets


def _txt2img(capsys, out, *flags):
    code = main(["txt2img", "--prompt", "a red circle", "--seed", "3", *SIZE, "--outdir",
                 str(out), "--no-progress", *flags])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    path = captured.out.strip().splitlines()[-1]
    return np.asarray(Image.open(path)), read_png_metadata(path)


def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("ldm: error: ") and err.count("\n") == 1, err
    return err


def test_names_resolve_and_a_path_wins(names, tmp_path, monkeypatch):
    root, _ = names
    assert bundled.bundled_names() == ["tiny", "tiny-lora"]
    assert bundled.resolve_model("tiny-lora") == root / "tiny-lora"
    assert bundled.resolve_model(None) == root / bundled.DEFAULT_NAME
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert bundled.resolve_model("tiny").resolve() == tmp_path / "tiny"  # the path wins
    # a manifest's base: its bundled name whatever the working directory holds, or a path
    # relative to the manifest's folder
    assert bundled.read_manifest(root / "tiny-lora").base_path() == root / "tiny"
    folder = tmp_path / "elsewhere" / "lora"
    shutil.copytree(root / "tiny-lora", folder)
    manifest = json.loads((folder / bundled.MANIFEST).read_text())
    manifest["base"] = os.path.relpath(root / "tiny", folder)
    (folder / bundled.MANIFEST).write_text(json.dumps(manifest))
    assert bundled.read_manifest(folder).base_path().resolve() == root / "tiny"
    with pytest.raises(CheckpointError, match=r"no such file, folder or bundled model.*tiny-lora"):
        bundled.resolve_model("no-such-model")
    with pytest.raises(CheckpointError):
        bundled.resolve_model("../assets")  # never a name


BAD = [
    ("{not json", "not valid JSON"),
    ('{"kind": "lora", "base": "tiny", "lora": "lora.safetensors", "colour": 1}', "colour"),
    ('{"kind": "checkpoint"}', "unknown kind 'checkpoint'"),
    ('{"base": "tiny", "lora": "lora.safetensors"}', '"kind": "lora"'),
    ('{"kind": "lora", "base": "tiny", "lora": "missing.safetensors"}', "missing.safetensors"),
    ('{"kind": "lora", "base": "nowhere", "lora": "lora.safetensors"}', "base 'nowhere'"),
    ('{"kind": "lora", "base": "tiny-lora", "lora": "lora.safetensors"}', "itself a LoRA"),
    ('{"kind": "lora", "base": "tiny", "lora": "lora.safetensors", "lora_scale": "x"}', "scale"),
    ('{"defaults": {"steps": 0}}', "defaults.steps"),
    ('{"defaults": {"sampler": "no-such-sampler"}}', "no-such-sampler"),
    ('{"defaults": {"schedule": "no-such"}}', "no-such"),
    ('{"defaults": {"cfg": 2}}', "unknown default(s) cfg"),
    ('{"defaults": {"sampler": "tcd", "eta": -1}}', "eta must be a number >= 0"),
    ('{"defaults": {"sampler": "euler", "eta": 0.5}}', "eta needs a sampler that takes one"),
    ('{"defaults": {"eta": 0.5}}', "eta needs a sampler that takes one"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_bad_manifest_is_a_one_line_error(names, tmp_path, capsys, text, message):
    folder = tmp_path / "model"
    shutil.copytree(names[0] / "tiny-lora", folder)
    (folder / bundled.MANIFEST).write_text(text)
    err = _error(capsys, ["txt2img", "--model", str(folder), "--prompt", "x", "--outdir",
                          str(tmp_path / "out")])  # fmt: skip
    assert message in err and bundled.MANIFEST in err
    assert not (tmp_path / "out").exists()


def test_unknown_name_is_a_one_line_error_everywhere(names, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    for argv in (["txt2img", "--prompt", "x"], ["batch", "--prompts", str(prompts)],
                 ["eval", "shapes", "--prompts", str(prompts)], ["serve"]):  # fmt: skip
        err = _error(capsys, [*argv, "--model", "no-such-model"])
        assert (
            "--model no-such-model: no such file, folder or bundled model (tiny, tiny-lora)" in err
        )
    err = _error(capsys, ["txt2img", "--prompt", "x", "--refiner", "no-such-model"])
    assert "--refiner no-such-model: no such file, folder or bundled model" in err


def test_models_lists_names_kinds_defaults_sizes(names, capsys):
    root, _ = names
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tiny = next(line for line in lines if line.startswith("tiny "))
    lora = next(line for line in lines if line.startswith("tiny-lora "))
    assert "model" in tiny and "dpmpp_2m, 20 steps, CFG 7.5" in tiny  # the SD 1.x family's
    assert "LoRA on tiny" in lora and "euler, 3 steps, CFG 1" in lora and "tiny, distilled" in lora

    assert main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["tiny-lora"]["kind"] == "lora" and listed["tiny-lora"]["base"] == "tiny"
    assert listed["tiny-lora"]["defaults"] == {**STORED, "schedule": "default"}
    assert listed["tiny-lora"]["stored_defaults"] == STORED
    assert listed["tiny"]["kind"] == "model" and listed["tiny"]["stored_defaults"] == {}
    for name, model in listed.items():
        files = [p for p in (root / name).rglob("*") if p.is_file()]
        assert model["size_bytes"] == sum(p.stat().st_size for p in files) > 0


def _addnet_hash(path) -> str:
    """A1111's LoRA hash, closed form: sha256 of the bytes after the safetensors header."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n :]).hexdigest()[:12]


def test_lora_model_generates_with_its_stored_defaults(names, tmp_path, capsys):
    root, kohya = names
    image, (infotext, record) = _txt2img(capsys, tmp_path / "a", "--model", "tiny-lora")
    explicit, (_, explicit_record) = _txt2img(
        capsys, tmp_path / "b", "--model", str(root / "tiny"), "--lora", f"{kohya}:1.0",
        "--sampler", "euler", "--steps", "3", "--guidance-scale", "1",
    )  # fmt: skip
    base, _ = _txt2img(capsys, tmp_path / "c", "--model", "tiny", "--sampler", "euler",
                       "--steps", "3", "--guidance-scale", "1")  # fmt: skip
    assert np.array_equal(image, explicit)
    assert np.abs(image.astype(int) - base).max() > 10  # the LoRA is really merged
    assert (record["sampler"], record["steps"], record["guidance_scale"]) == ("euler", 3, 1.0)
    # A1111's choice for a LoRA on a checkpoint: the base is the model, the LoRA listed apart
    assert record["model"] == "tiny" and record["model_hash"] == explicit_record["model_hash"]
    (lora,) = record["loras"]
    assert lora["name"] == "tiny-lora" and lora["scale"] == 1.0
    assert lora["hash"] == _addnet_hash(root / "tiny-lora" / "lora.safetensors")
    assert "Model: tiny," in infotext

    # --from-png re-applies the LoRA from the record: the same image
    png = sorted((tmp_path / "a").glob("*.png"))[0]
    again, _ = _txt2img(capsys, tmp_path / "d", "--from-png", str(png))
    assert np.array_equal(again, image)


def test_explicit_flags_override_stored_defaults(names, tmp_path, capsys):
    _, (_, record) = _txt2img(capsys, tmp_path / "a", "--model", "tiny-lora", "--steps", "2")
    assert (record["sampler"], record["steps"], record["guidance_scale"]) == ("euler", 2, 1.0)
    _, (_, record) = _txt2img(capsys, tmp_path / "b", "--model", "tiny-lora", "--sampler", "ddim",
                              "--guidance-scale", "2.5")  # fmt: skip
    assert (record["sampler"], record["steps"], record["guidance_scale"]) == ("ddim", 3, 2.5)


def test_stored_eta_goes_with_the_stored_sampler(names, tmp_path, capsys):
    """A TCD student's gamma as a stored default: used with its own sampler, not another's;
    an explicit --eta wins; ``ldm models`` shows it."""
    root, kohya = names
    folder = root / "tiny-tcd"
    shutil.copytree(root / "tiny-lora", folder)
    manifest = json.loads((folder / bundled.MANIFEST).read_text())
    manifest["defaults"] = {"sampler": "tcd", "eta": 0.7, "steps": 3, "guidance_scale": 1.0}
    (folder / bundled.MANIFEST).write_text(json.dumps(manifest))
    image, (_, record) = _txt2img(capsys, tmp_path / "a", "--model", "tiny-tcd")
    assert (record["sampler"], record["eta"], record["steps"]) == ("tcd", 0.7, 3)
    explicit, _ = _txt2img(capsys, tmp_path / "b", "--model", str(root / "tiny"), "--lora",
                           f"{kohya}:1.0", "--sampler", "tcd", "--eta", "0.7", "--steps", "3",
                           "--guidance-scale", "1")  # fmt: skip
    assert np.array_equal(image, explicit)
    own, (_, record) = _txt2img(capsys, tmp_path / "c", "--model", "tiny-tcd", "--sampler", "tcd",
                                "--eta", "0.3")  # fmt: skip
    assert record["eta"] == 0.3 and np.abs(own.astype(int) - image).max() > 0
    _, (_, record) = _txt2img(capsys, tmp_path / "d", "--model", "tiny-tcd", "--sampler",
                              "euler_ancestral")  # fmt: skip
    assert record["eta"] == 1.0  # the other sampler's own
    assert main(["models"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tiny-tcd "))
    assert "tcd, eta 0.7, 3 steps, CFG 1" in line


def test_full_model_manifest_and_library_names(names, tmp_path):
    from ldm.loading import model_hash
    from ldm.pipeline import load_pipeline

    folder = tmp_path / "student"
    shutil.copytree(names[0] / "tiny", folder)
    (folder / bundled.MANIFEST).write_text('{"defaults": {"sampler": "ddim", "steps": 2}}')
    pipe = load_pipeline(folder)
    assert pipe.sampling_defaults == {"sampler": "ddim", "schedule": "default", "steps": 2,
                                      "guidance_scale": 7.5}  # fmt: skip
    pipe = load_pipeline("tiny-lora")
    assert pipe.sampling_defaults["steps"] == 3 and pipe.model_name == "tiny"
    assert model_hash(names[0] / "tiny-lora") == model_hash(names[0] / "tiny")


def test_batch_with_a_name_uses_the_stored_defaults_and_resumes(names, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    argv = ["batch", "--model", "tiny-lora", "--prompts", str(prompts), "--outdir",
            str(tmp_path / "out"), *SIZE, "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    pngs = sorted((tmp_path / "out").rglob("*.png"))
    assert len(pngs) == 2
    _, record = read_png_metadata(pngs[0])
    assert (record["sampler"], record["steps"], record["guidance_scale"]) == ("euler", 3, 1.0)
    assert [lora["name"] for lora in record["loras"]] == ["tiny-lora"]
    before = {p: p.read_bytes() for p in pngs}
    assert main(argv) == 0  # the same command again: resumed, nothing made twice
    assert "0 made, 2 already done" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in pngs} == before


def test_eval_and_serve_take_names(names, tmp_path, capsys):
    from ldm.loading import model_hash
    from ldm.serve.models import ModelTable

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    code = main(["eval", "shapes", "--model", "tiny-lora", "--prompts", str(prompts),
                 "--outdir", str(tmp_path / "eval"), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "eval" / "shapes-report.json").read_text())
    settings = report["settings"]
    assert (settings["model"], settings["sampler"], settings["steps"]) == ("tiny-lora", "euler", 3)

    table = ModelTable(["tiny-lora", "tiny"])
    assert table.names == ["tiny-lora", "tiny"]
    assert table.hash("tiny-lora") == model_hash(names[0] / "tiny")  # the base's, as A1111
    assert table.resolve("TINY-LORA") == "tiny-lora"


def test_the_shipped_models_are_listed(capsys):
    import ldm

    shipped = Path(ldm.__file__).parent / "assets" / "shapes-demo"  # not a patched BUNDLED_DIR
    assert bundled.resolve_model(None) == shipped == bundled.resolve_model("shapes-demo")
    assert main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["shapes-demo"]["kind"] == "model"
    assert listed["shapes-demo"]["defaults"]["steps"] == 20  # the README's first command's
    if "shapes-demo-lcm" in listed:  # shipped by the distillation run (issue 23)
        assert listed["shapes-demo-lcm"]["base"] == "shapes-demo-eps"
        assert listed["shapes-demo-lcm"]["size_bytes"] <= 10e6  # the budget
