"""Robustness and security (issue 7), input to the CLI: bad flags and models, prompt files,
hostile prompts as output names, NaN at generation time. Weights on disk: test_robustness.py.

Each case is listed in docs/robustness.md with its test id. Every refusal is checked the same
way: exit 2, one ``ldm: error:`` line, no traceback, nothing written; ``tracemalloc`` bounds the
memory of huge prompt files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

from ldm.cli import main

ROOT = Path(__file__).resolve().parents[1]


# ---- bad input on the command line -----------------------------------------------------------
def _txt2img(capsys, *argv) -> tuple[int, list[str], str]:
    rc = main(["txt2img", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def _assert_refused(rc: int, out, err: str, outdir: Path, words: str) -> None:
    assert rc == 2, err
    assert err.startswith("ldm: error: ") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err
    assert not out
    assert not outdir.exists() or not any(outdir.iterdir())


@pytest.fixture
def bad_models(tmp_path) -> dict[str, Path]:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    empty_dir = tmp_path / "empty-model"
    empty_dir.mkdir()
    lfs = tmp_path / "lfs.safetensors"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    return {"garbage": garbage, "empty_dir": empty_dir, "lfs": lfs}


BAD_CLI = {
    "width_513": (["--W", 513], "--width 513"),
    "height_negative_odd": (["--H", -513], "--height"),
    "guidance_inf": (["--guidance-scale", "inf"], "--guidance-scale"),
    "steps_negative": (["--steps", -3], "--steps"),
    "strength_zero": (["--init-image", "{image}", "--strength", 0], "--strength"),
    "model_garbage": (["--model", "{garbage}"], "garbage.safetensors"),
    "model_empty_dir": (["--model", "{empty_dir}"], "empty-model"),
    "model_lfs_pointer": (["--model", "{lfs}"], "git-lfs pointer"),
}


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_cli_bad_input_more_cases(case, tiny_sd1, tmp_path, bad_models, capsys):
    from PIL import Image

    image = tmp_path / "init.png"
    Image.new("RGB", (16, 16)).save(image)
    extra, words = BAD_CLI[case]
    values = dict(bad_models, image=image)
    argv = {"--model": tiny_sd1, "--prompt": "x", "--steps": 1, "--outdir": tmp_path / "out"}
    for flag, value in zip(extra[::2], extra[1::2]):
        argv[flag] = value.format(**values) if isinstance(value, str) else value
    rc, out, err = _txt2img(capsys, *[str(x) for kv in argv.items() for x in kv])
    _assert_refused(rc, out, err, tmp_path / "out", words)


def test_cli_enormous_size_is_refused_before_allocating(tiny_sd1, tmp_path, capsys, monkeypatch):
    """Like ``ldm batch --max-size`` (default 4096), txt2img must refuse giant sizes up front."""
    real = torch.randn

    def guarded(*args, **kwargs):  # stands in for the allocator failing (or swapping for hours)
        shape = args[0] if args and isinstance(args[0], (tuple, list, torch.Size)) else args
        if torch.Size(shape).numel() > 1 << 24:
            raise RuntimeError("DefaultCPUAllocator: not enough memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", guarded)
    out = tmp_path / "out"
    common = ["--model", tiny_sd1, "--prompt", "x", "--steps", 1, "--outdir", out]
    rc, paths, err = _txt2img(capsys, *common, "--H", 2**20, "--W", 2**20)
    _assert_refused(rc, paths, err, out, "4096")
    rc, paths, err = _txt2img(capsys, *common, "--H", 16, "--W", 16, "--max-size", 8)
    _assert_refused(rc, paths, err, out, "--max-size")


def test_cli_errors_through_the_interpreter(tiny_sd1, tmp_path):
    """``python -m ldm``: one line on stderr, exit 2, no traceback, nothing in --outdir."""
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(1000))
    cases = {
        "size": ["--model", tiny_sd1, "--W", 513],
        "model": ["--model", garbage],
    }
    procs = {}
    for name, extra in cases.items():
        argv = [sys.executable, "-m", "ldm", "txt2img", "--prompt", "x", "--steps", "1",
                "--outdir", str(tmp_path / name), *map(str, extra)]  # fmt: skip
        procs[name] = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)  # fmt: skip
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err)
        assert err.startswith("ldm: error: ") and err.count("\n") == 1, (name, err)
        assert "Traceback" not in err and out == ""
        assert not (tmp_path / name).exists()


# ---- prompt files ----------------------------------------------------------------------------
def test_million_line_prompt_file_is_streamed(tmp_path):
    """1,000,000 lines, line 999,999 bad: found by number, in bounded memory, in seconds.

    Most lines are comments so the test stays fast; the 10k real-prompt case in test_batch.py
    bounds the per-job memory. The prompt lines at the start and end prove jobs are counted.
    """
    from ldm.batch.jobs import JobSpec, validate

    spec = JobSpec(factor=8, default_size=(64, 64))
    path = tmp_path / "million.txt"
    head = b"a red cube\n--prompt 'a blue ball' --seed 3\n"
    path.write_bytes(head + b"# filler\n" * 999_996 + b"--prompt x --width 513\nlast\n")
    warm = tmp_path / "warm.txt"
    warm.write_text("a\n")
    validate(warm, spec)  # lazy imports happen here, not while measuring
    tracemalloc.start()
    try:
        num_jobs, invalid, num_invalid = validate(path, spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (num_jobs, num_invalid) == (3, 1)
    assert invalid[0].line == 999_999 and "513" in invalid[0].message
    assert peak < 2 * 2**20, peak  # the file is ~9 MB; holding its lines would take far more


def test_batch_refuses_a_bad_line_by_number(tiny_sd1, tmp_path, capsys):
    """Bad UTF-8 and bad options: refused before the first image, each line named."""
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(
        b"good\nbad \xc3\x28 utf8\n--prompt x --cfg_scale nan\n--prompt y --nope 1\n"
    )
    out = tmp_path / "out"
    rc = main(["batch", "--prompts", str(prompts), "--model", str(tiny_sd1), "--outdir",
               str(out), "--steps", "1", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    for line in (2, 3, 4):
        assert f"{prompts}:{line}:" in err
    assert err.strip().splitlines()[-1].startswith("ldm: error: ")
    assert not out.exists() or not list(out.glob("*.png"))


# ---- output names ----------------------------------------------------------------------------
HOSTILE = ["../../escape/CON", "a/b\\c\x00d\x1b\n..", "🎨" * 75, "a cat", "A CAT!"]


def test_txt2img_names_from_hostile_prompts_stay_inside(tiny_sd1, tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    written = []
    for prompt in HOSTILE:
        rc, paths, err = _txt2img(capsys, "--model", tiny_sd1, "--prompt", prompt, "--steps", 1,
                                  "--H", 16, "--W", 16, "--seed", 7, "--outdir", out,
                                  "--no-progress")  # fmt: skip
        assert rc == 0, err
        written += paths
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == len(HOSTILE) == len(set(written))  # nothing overwritten
    for f in files:
        assert f.parent == out and f.suffix == ".png"
        assert len(f.name.encode()) <= 100 and f.name.isascii() and f.name.isprintable()
        assert f.stem.split("-")[0].isdigit()  # never a bare reserved name like CON


def test_batch_names_from_hostile_prompts_stay_inside(tiny_sd1, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HOSTILE))
    out = tmp_path / "deep" / "out"
    rc = main(["batch", "--prompts", str(prompts), "--model", str(tiny_sd1), "--outdir",
               str(out), "--steps", "1", "--H", "16", "--W", "16", "--batch-size", "4",
               "--no-progress"])  # fmt: skip
    assert rc == 0
    pngs = [p for p in tmp_path.rglob("*.png")]
    assert len(pngs) == len(HOSTILE) and all(p.parent == out for p in pngs)
    assert all(p.name.isascii() and len(p.name.encode()) < 80 for p in pngs)


# ---- NaN at generation time: an error, never a saved "success" -------------------------------
def test_unet_nan_saves_nothing(tiny_sd1, tmp_path, capsys, monkeypatch):
    from ldm.models.unet import UNet2DConditionModel

    real = UNet2DConditionModel.forward

    def nan_forward(self, *args, **kwargs):
        return real(self, *args, **kwargs) * float("nan")

    monkeypatch.setattr(UNet2DConditionModel, "forward", nan_forward)
    out = tmp_path / "out"
    rc, paths, err = _txt2img(capsys, "--model", tiny_sd1, "--prompt", "x", "--steps", 2,
                              "--H", 16, "--W", 16, "--seed", 1, "--outdir", out)  # fmt: skip
    _assert_refused(rc, paths, err, out, "NaN")


def test_emphasis_never_makes_a_non_finite_context(tiny_sd1):
    """A1111 "Original" emphasis rescales by original_mean / weighted_mean: guard the division."""
    from ldm.pipeline import load_pipeline
    from ldm.text.prompts import encode_prompts

    pipe = load_pipeline(str(tiny_sd1))
    # the prompt was found by the hostile-name test
    cond = encode_prompts(pipe.text_encoder(clip_skip=1), ["a/b\\c\x00d\x1b[2J\n"])
    assert torch.isfinite(cond.context).all()


def test_vae_nan_in_fp32_too_saves_nothing(tiny_sd1, tmp_path, capsys, monkeypatch):
    from ldm.models.autoencoder import AutoencoderKL

    monkeypatch.setattr(AutoencoderKL, "decode", lambda self, z: torch.full(
        (len(z), 3, z.shape[2] * 2, z.shape[3] * 2), float("nan")))  # fmt: skip
    out = tmp_path / "out"
    rc, paths, err = _txt2img(capsys, "--model", tiny_sd1, "--prompt", "x", "--steps", 1,
                              "--H", 16, "--W", 16, "--seed", 1, "--outdir", out,
                              "--no-progress")  # fmt: skip
    _assert_refused(rc, paths, err, out, "NaN")


def test_vae_nan_in_bf16_is_redone_in_fp32_and_recorded(tiny_sd1, tmp_path, capsys, monkeypatch):
    from ldm.infotext import read_png_metadata
    from ldm.models.autoencoder import AutoencoderKL

    real = AutoencoderKL.decode

    def nan_in_half(self, latents):
        pixels = real(self, latents)
        return pixels * float("nan") if latents.dtype != torch.float32 else pixels

    monkeypatch.setattr(AutoencoderKL, "decode", nan_in_half)
    rc, paths, err = _txt2img(capsys, "--model", tiny_sd1, "--prompt", "x", "--steps", 1,
                              "--H", 16, "--W", 16, "--seed", 1, "--dtype", "bf16",
                              "--outdir", tmp_path / "out", "--no-progress")  # fmt: skip
    assert rc == 0, err
    record = read_png_metadata(paths[0])[1]
    assert record["nan_retry_fp32"] is True and record["dtype"] == "bf16"
