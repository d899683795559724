"""Robustness and security (issue 7): hostile checkpoints, bad input, faults while writing.

Cases already covered elsewhere are listed in docs/robustness.md with their test ids; this file
holds the rest. Every test must be able to fail: a canary file proves no pickle code ran, a
recording ``torch.load`` proves no unsafe retry, ``tracemalloc`` bounds the memory of hostile
headers and huge prompt files, and monkeypatched writers fail half-way to simulate a full disk.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

from ldm.cli import main
from ldm.errors import CheckpointError
from ldm.formats.safe_load import load_state_dict, save_state_dict

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs ``open(canary, "w")``: full unpickling would execute code."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (open, (self.canary, "w"))


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg
    return msg


# ---- checkpoints are data, never code --------------------------------------------------------
def _nested(path: Path, canary: Path) -> None:
    """The payload deep inside plain containers next to real tensors."""
    evil = {"state_dict": {"w": torch.zeros(2), "meta": [1, (2, {"x": [_Payload(canary)]})]}}
    torch.save(evil, path)


def _payload_then_garbage(path: Path, canary: Path) -> None:
    """Legacy pickle: the payload's REDUCE runs, then a broken opcode raises (too late)."""
    raw = pickle.dumps(_Payload(canary), protocol=2)
    path.write_bytes(raw[:-1] + b"\xff\xff")  # drop STOP, add an invalid opcode


def _payload_in_legacy_magic(path: Path, canary: Path) -> None:
    """torch's legacy format reads a magic-number pickle first: put the payload there."""
    path.write_bytes(pickle.dumps(_Payload(canary), protocol=2) + pickle.dumps(0, protocol=2))


def _payload_in_tensor_rebuild(path: Path, canary: Path) -> None:
    """A zip checkpoint whose tensor rebuild call gets a payload as its hook argument."""

    class Tensorish:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (_Payload(canary), 0, (1,), (1,), False, {}))

    torch.save({"w": Tensorish()}, path)


WRAPPED = {
    "nested": _nested,
    "payload_then_garbage": _payload_then_garbage,
    "legacy_magic": _payload_in_legacy_magic,
    "tensor_rebuild": _payload_in_tensor_rebuild,
}


@pytest.fixture
def torch_load_calls(monkeypatch) -> list[dict]:
    """Record every ``torch.load`` call's keyword arguments (to prove no unsafe retry)."""
    calls: list[dict] = []
    real = torch.load

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    return calls


@pytest.mark.parametrize("case", list(WRAPPED))
def test_wrapped_pickle_payload_never_runs(tmp_path, case, torch_load_calls):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.ckpt"
    WRAPPED[case](path, canary)
    with pytest.raises(CheckpointError) as e:
        load_state_dict(path)
    assert str(path) in _one_line(e.value)
    assert not canary.exists()
    assert torch_load_calls and all(c.get("weights_only") is True for c in torch_load_calls)


def test_never_retries_unsafe_loading(tmp_path, torch_load_calls):
    """Good and evil files, and a training checkpoint: torch.load only ever weights-only."""
    from ldm.train.checkpoint import load_checkpoint, save_checkpoint

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    evil = tmp_path / "evil.pt"
    torch.save({"w": _Payload(tmp_path / "canary")}, evil)
    assert torch.equal(load_state_dict(good)["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="full unpickling"):
        load_state_dict(evil)
    ck = save_checkpoint(tmp_path / "run", 1, {"unet": {"w": torch.ones(2)}}, {"x": 1}, {}, 2)
    (ck / "optimizer.pt").write_bytes(evil.read_bytes())  # a swapped optimizer file
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(ck)
    assert not (tmp_path / "canary").exists()
    assert len(torch_load_calls) == 3
    assert all(c.get("weights_only") is True for c in torch_load_calls)


def test_sd_style_ckpt_with_plain_containers_loads(tmp_path):
    """An original-SD-shaped .ckpt: fp16 weights, step counters, nested plain metadata."""
    weights = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3).half(),
        "first_stage_model.decoder.conv_out.bias": torch.randn(3),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
    }
    obj = {"state_dict": weights, "global_step": 470000, "epoch": 6,
           "callbacks": {"ModelCheckpoint": {"best_model_score": None, "dirpath": "/x"}},
           "lr_schedulers": [], "pytorch-lightning_version": "1.4.2"}  # fmt: skip
    path = tmp_path / "v1-5.ckpt"
    torch.save(obj, path)
    back = load_state_dict(path)
    assert back.keys() == weights.keys()
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in weights.items())


# ---- malformed safetensors in bounded memory --------------------------------------------------
@pytest.mark.parametrize("claim", [99_000_000, 2**40, 2**64 - 1])
def test_huge_header_claim_allocates_nothing(tmp_path, claim):
    path = tmp_path / "claim.safetensors"
    path.write_bytes(struct.pack("<Q", claim) + b'{"a": 1}')
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as e:
            load_state_dict(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # the claimed header was never read into memory
    assert str(path) in _one_line(e.value)


def test_real_huge_header_is_refused_before_parsing(tmp_path):
    """A header just over the 100 MB limit, sparse on disk: refused from its length alone."""
    path = tmp_path / "big.safetensors"
    n = 100_000_001
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.seek(8 + n - 1)
        f.write(b" ")
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="exceeds the limit"):
            load_state_dict(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.fixture
def tampered(tiny_sd1, tmp_path):
    """A copy of the tiny folder and a function that rewrites one U-Net tensor."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd1, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"

    def tamper(name: str, change) -> Path:
        sd = load_state_dict(weights)
        sd[name] = change(sd[name])
        weights.unlink()
        save_state_dict(sd, weights)
        return folder

    return tamper


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda t: t.reshape(-1), "has shape"),
        (lambda t: t[:-1], "has shape"),
        (lambda t: t.to(torch.int32), "dtype"),
    ],
    ids=["flattened", "one_short", "integer"],
)
def test_wrong_shape_or_dtype_in_a_folder_names_the_tensor(tampered, change, words):
    from ldm.formats.diffusers_folder import load_folder

    name = "conv_in.weight"
    folder = tampered(name, change)
    with pytest.raises(CheckpointError) as e:
        load_folder(folder)
    msg = _one_line(e.value)
    assert name in msg and words in msg and str(folder / "unet") in msg


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


# ---- faults while writing --------------------------------------------------------------------
def _half_then_enospc(real_save):
    """A save_file that writes half the bytes, then fails as a full disk does."""

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    return save_file


@pytest.mark.parametrize("where", ["weights", "optimizer", "state"])
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, where):
    import safetensors.torch

    from ldm.train import checkpoint as ck

    run = tmp_path / "run"
    good = {"unet": {"w": torch.arange(4.0)}, "vae": {"v": torch.ones(3)}}
    first = ck.save_checkpoint(run, 1, good, {"step": 1}, {"global_step": 1}, keep=1)
    if where == "weights":
        monkeypatch.setattr(ck, "save_file", _half_then_enospc(safetensors.torch.save_file))
    elif where == "optimizer":

        def broken_save(obj, f, *args, **kwargs):
            Path(f).write_bytes(b"PK\x03\x04 half a zip")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(torch, "save", broken_save)
    else:
        real = Path.write_text

        def broken_write(self, *args, **kwargs):
            if self.name == "state.json":
                raise RuntimeError("killed while writing state.json")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", broken_write)
    bad = {"unet": {"w": torch.zeros(4)}, "vae": {"v": torch.zeros(3)}}
    with pytest.raises((OSError, RuntimeError)):
        ck.save_checkpoint(run, 2, bad, {"step": 2}, {"global_step": 2}, keep=1)
    monkeypatch.undo()
    assert ck.latest_checkpoint(run) == first
    assert [p.name for p in (run / "checkpoints").iterdir()] == [first.name]  # no temp left
    weights, optim, state = ck.load_checkpoint(first)
    assert torch.equal(weights["unet"]["w"], torch.arange(4.0)) and state["global_step"] == 1
    assert optim == {"step": 1}


def test_leftover_temp_folder_of_a_killed_write_is_ignored(tmp_path):
    from ldm.train import checkpoint as ck

    run = tmp_path / "run"
    first = ck.save_checkpoint(run, 1, {"unet": {"w": torch.ones(2)}}, {}, {"global_step": 1}, 3)
    torn = run / "checkpoints" / ".step-00000002.abc123"  # what SIGKILL mid-write leaves
    torn.mkdir()
    (torn / "unet.safetensors").write_bytes(b"\x08\x00\x00")
    assert ck.checkpoint_dirs(run) == [first] and ck.latest_checkpoint(run) == first
    second = ck.save_checkpoint(run, 2, {"unet": {"w": torch.ones(2)}}, {}, {"global_step": 2}, 3)
    assert ck.latest_checkpoint(run) == second


def test_atomic_writes_keep_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
    import safetensors.torch

    from ldm.formats import safe_load
    from ldm.io import atomic_save, atomic_write_text

    text = tmp_path / "config.yaml"
    atomic_write_text(text, "old: 1\n")

    def half_then_full(tmp: Path) -> None:
        tmp.write_text("new: ")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_save(text, half_then_full)
    weights = tmp_path / "w.safetensors"
    save_state_dict({"w": torch.ones(8)}, weights)
    monkeypatch.setattr(safe_load, "save_file", _half_then_enospc(safetensors.torch.save_file))
    with pytest.raises(OSError):
        save_state_dict({"w": torch.zeros(8)}, weights)
    monkeypatch.undo()
    assert text.read_text() == "old: 1\n"
    assert torch.equal(load_state_dict(weights)["w"], torch.ones(8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "w.safetensors"]


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
