"""``ldm txt2img`` end to end on a tiny random folder: files, names, metadata, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.cli import main
from ldm.infotext import parse_infotext, read_png_metadata

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv) -> tuple[int, list[str], str]:
    rc = main(["txt2img", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_writes_pngs_with_infotext_record_and_grid(tiny_sd1, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--model", tiny_sd1, "--steps", 2, "--H", 16, "--W", 24, "--outdir", out]
    rc, paths, err = _run(
        capsys, *common, "--prompt", "A red circle, (big:1.2)", "--negative-prompt",
        "blurry, dark", "--seed", 5, "--n-samples", 2, "--sampler", "DPM++ 2M Karras",
        "--guidance-scale", 6.5, "--grid",
    )  # fmt: skip
    assert rc == 0, err
    assert [Path(p).name for p in paths] == [
        "00000-5-a-red-circle-big-1-2.png",
        "00001-6-a-red-circle-big-1-2.png",
        "00002-grid-a-red-circle-big-1-2.png",
    ]
    assert "100%" in err  # the progress bar went to stderr
    assert Image.open(paths[2]).size == (48, 16)
    infotext, record = read_png_metadata(paths[1])
    assert Image.open(paths[1]).size == (24, 16)
    assert record["seed"] == 6 and record["prompt"] == "A red circle, (big:1.2)"
    assert (record["sampler"], record["schedule"]) == ("dpmpp_2m", "karras")
    assert record["model"] == tiny_sd1.name and len(record["model_hash"]) == 10
    params = parse_infotext(infotext)
    # A1111 >= 1.9 renders DPM++ 2M's "Automatic" with the Karras schedule
    assert "Sampler: DPM++ 2M, Schedule type: Automatic" in infotext
    for key in ("prompt", "negative_prompt", "steps", "sampler", "schedule", "guidance_scale",
                "seed", "width", "height", "model_hash", "model"):  # fmt: skip
        assert params[key] == record[key], key

    # a second run never overwrites: numbering continues
    rc, again, _ = _run(capsys, *common, "--prompt", "A red circle, (big:1.2)", "--seed", 5)
    assert rc == 0 and [Path(p).name for p in again] == ["00003-5-a-red-circle-big-1-2.png"]

    # --from-png re-renders the same pixels from the embedded record
    rc, rerun, err = _run(capsys, "--from-png", paths[1], "--outdir", tmp_path / "rerun")
    assert rc == 0, err
    np.testing.assert_array_equal(_pixels(rerun[0]), _pixels(paths[1]))
    assert read_png_metadata(rerun[0])[1]["negative_prompt"] == "blurry, dark"


def test_random_seed_is_printed_and_used(tiny_sd1, tmp_path, capsys):
    rc, paths, err = _run(
        capsys, "--model", tiny_sd1, "--prompt", "x", "--steps", 1, "--H", 16, "--W", 16,
        "--outdir", tmp_path, "--no-progress",
    )  # fmt: skip
    assert rc == 0
    seed = int(err.split("seed: ")[1].split()[0])
    assert read_png_metadata(paths[0])[1]["seed"] == seed
    assert f"-{seed}-x.png" in paths[0]


def test_img2img_and_outpaint(tiny_sd1, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)).save(init)
    common = ["--model", tiny_sd1, "--prompt", "x", "--steps", 2, "--seed", 1, "--no-progress"]
    rc, paths, err = _run(capsys, *common, "--init-image", init, "--strength", 0.5,
                          "--outdir", tmp_path / "i2i")  # fmt: skip
    assert rc == 0, err
    infotext, record = read_png_metadata(paths[0])
    assert record["mode"] == "img2img" and Image.open(paths[0]).size == (16, 16)
    assert "Denoising strength: 0.5" in infotext
    rc, paths, err = _run(capsys, *common, "--init-image", init, "--outpaint", "4,4,0,2",
                          "--outdir", tmp_path / "out")  # fmt: skip
    assert rc == 0, err
    assert Image.open(paths[0]).size == (24, 18)
    assert read_png_metadata(paths[0])[1]["mode"] == "outpaint"


@pytest.fixture
def bad_files(tmp_path):
    text = tmp_path / "not-an-image.png"
    text.write_text("hello")
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16)).save(good)
    return {"text": text, "good": good}


BAD = {
    "height-not-multiple": (["--H", 15], "--height 15 is not a multiple of 2"),
    "zero-width": (["--W", 0], "--width"),
    "negative-height": (["--H", -16], "--height"),
    "zero-steps": (["--steps", 0], "--steps"),
    "unknown-sampler": (["--sampler", "bogus"], "unknown sampler"),
    "unknown-schedule": (["--schedule", "bogus"], "--schedule"),
    "missing-model": (["--model", "/nonexistent/model"], "--model"),
    "missing-init-image": (["--init-image", "/nonexistent.png"], "--init-image"),
    "unreadable-init-image": (["--init-image", "{text}"], "--init-image"),
    "unreadable-mask": (["--init-image", "{good}", "--mask", "{text}"], "--mask"),
    "mask-without-image": (["--mask", "{good}"], "--mask needs --init-image"),
    "nan-guidance": (["--guidance-scale", "nan"], "--guidance-scale"),
    "no-prompt": (["--prompt", None], "--prompt"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tiny_sd1, tmp_path, bad_files,
                                                         capsys):  # fmt: skip
    extra, message = BAD[case]
    argv = {"--model": tiny_sd1, "--prompt": "x", "--steps": 1, "--outdir": tmp_path / "out"}
    for flag, value in zip(extra[::2], extra[1::2]):
        argv[flag] = value.format(**bad_files) if isinstance(value, str) else value
    flat = [str(x) for k, v in argv.items() if v is not None for x in (k, v)]
    rc, out, err = _run(capsys, *flat)
    assert rc == 2
    assert err.startswith("ldm: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert out == [] and not (tmp_path / "out").exists()


def test_script_wrapper_reports_errors_like_the_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--prompt", "x", "--steps", "0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == "txt2img.py: error: --steps must be >= 1, got 0\n"


def test_accel_choice_is_printed_and_recorded(tiny_sd1, tmp_path, capsys, monkeypatch):
    from ldm.accel import ENV_VAR, MODES

    with pytest.raises(SystemExit):
        _run(capsys, "--help")
    help_text = capsys.readouterr().out
    assert all(mode in help_text for mode in MODES), help_text[-300:]
    common = ["--model", tiny_sd1, "--steps", 1, "--H", 16, "--W", 16, "--prompt", "x", "--seed", 3]
    monkeypatch.setenv(ENV_VAR, "off")  # the default when --accel is not given
    rc, paths, err = _run(capsys, *common, "--outdir", tmp_path / "a", "--verbose")
    assert rc == 0 and "ldm: accel: off" in err
    assert read_png_metadata(paths[0])[1]["accel"] == "off"
    rc, paths, err = _run(capsys, *common, "--outdir", tmp_path / "b", "--accel", "ldm-cpu")
    assert rc == 0 and "accel" not in err  # only --verbose says it
    assert read_png_metadata(paths[0])[1]["accel"] == "ldm-cpu"
    assert (_pixels(paths[0]) == _pixels(next((tmp_path / "a").iterdir()))).mean() > 0.99
    monkeypatch.setenv(ENV_VAR, "fast")
    rc, _, err = _run(capsys, *common, "--outdir", tmp_path / "c")
    assert rc == 2 and "fast" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())
