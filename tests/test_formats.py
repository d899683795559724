"""Safe checkpoint loading, the diffusers folder format, and ``ldm convert`` errors."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from ldm.errors import CheckpointError
from ldm.formats.diffusers_folder import load_folder, save_folder
from ldm.formats.safe_load import load_state_dict, save_state_dict, warn_non_finite


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------- safetensors


def test_save_and_load_round_trip(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5), "h": torch.randn(2).half()}
    sd["tied"] = sd["a"]  # shared storage must not stop safetensors from saving
    save_state_dict(sd, tmp_path / "w.safetensors", metadata={"format": "pt"})
    back = load_state_dict(tmp_path / "w.safetensors")
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert back["h"].dtype == torch.float16
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left


def _raw_safetensors(path: Path, header: dict, data: bytes, length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD = {"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 8, 16)}
MALFORMED = {  # name -> (header, data bytes, header length override, expected words)
    "truncated": (GOOD, bytes(12), None, "truncated"),
    "length_past_end": (GOOD, bytes(16), 10_000, "runs past the end"),
    "huge_header": (GOOD, bytes(16), 2**40, "exceeds the limit"),
    "overlap": ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, bytes(12), None,
                "overlaps"),
    "gap": ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 12, 20)}, bytes(20), None,
            "gap"),
    "trailing": (GOOD, bytes(20), None, "trailing"),
    "dtype": ({"a": _entry("Q4", [2], 0, 8)}, bytes(8), None, "unknown dtype"),
    "span": ({"a": _entry("F32", [3], 0, 8)}, bytes(8), None, "does not match"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_safetensors_is_refused_before_any_tensor(tmp_path, case, monkeypatch):
    header, data, length, words = MALFORMED[case]
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, data, length)
    made = []  # the header is judged before a single tensor is built from the data
    monkeypatch.setattr(torch, "frombuffer", lambda *a, **k: made.append(a) or torch.zeros(0))
    with pytest.raises(CheckpointError) as e:
        load_state_dict(path)
    assert made == []
    msg = _one_line(e.value)
    assert str(path) in msg and words in msg


def test_bad_json_and_lfs_pointer(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_state_dict(bad)
    pointer = tmp_path / "model.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(CheckpointError, match="git-lfs pointer.*git lfs pull"):
        load_state_dict(pointer)


def test_truncated_real_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_state_dict({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_state_dict(path)


def test_non_finite_weights_warn(tmp_path):
    path = tmp_path / "w.safetensors"
    save_state_dict({"ok": torch.zeros(2), "bad": torch.tensor([1.0, float("nan")])}, path)
    with pytest.warns(UserWarning, match="non-finite.*bad"):
        load_state_dict(path)


def test_non_finite_check_on_large_tensors():
    """The sum-first check: overflowing sums are not NaN; +Inf and -Inf together are found."""
    n = (1 << 16) + 1
    big = torch.full((n,), 60000.0, dtype=torch.float16)  # finite, but its fp16 sum overflows
    nan, infs = torch.zeros(n), torch.zeros(n, dtype=torch.bfloat16)
    nan[n // 2] = float("nan")
    infs[0], infs[-1] = float("inf"), float("-inf")
    state = {"big": big, "nan": nan, "infs": infs, "ints": torch.arange(n)}
    with pytest.warns(UserWarning) as record:
        assert warn_non_finite(state, "x") == ["nan", "infs"]
    assert len(record) == 1


# ---------------------------------------------------------------- pickles


class _Payload:
    """Unpickling this runs ``open(canary, "w")``: full unpickling executes code."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (open, (self.canary, "w"))


@pytest.mark.parametrize("kind", ["zip.ckpt", "legacy.ckpt", "zip.bin", "zip.safetensors"])
def test_malicious_pickle_is_refused(tmp_path, kind):
    canary = tmp_path / "canary"
    layout, suffix = kind.split(".")
    path = tmp_path / f"evil.{suffix}"
    obj = {"state_dict": {"w": torch.zeros(2), "evil": _Payload(canary)}}
    torch.save(obj, path, _use_new_zipfile_serialization=layout == "zip")
    with pytest.raises(CheckpointError) as e:
        load_state_dict(path)
    msg = _one_line(e.value)
    assert str(path) in msg
    if suffix != "safetensors":
        assert "full unpickling" in msg and "safetensors" in msg
    assert not canary.exists()


def test_plain_pickle_of_code_is_refused(tmp_path):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_Payload(canary)))
    with pytest.raises(CheckpointError, match="full unpickling"):
        load_state_dict(path)
    assert not canary.exists()


def test_genuine_ckpt_loads(tmp_path):
    weights = {"model.w": torch.randn(3), "model.b": torch.randn(2, 2)}
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": weights, "global_step": 10, "epoch": 1}, path)
    back = load_state_dict(path)
    assert set(back) == set(weights) and all(torch.equal(back[k], weights[k]) for k in back)


# ---------------------------------------------------------------- diffusers folders


def test_saved_folder_loads_in_diffusers(tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    parts = load_folder(tiny_sd1)
    assert parts.prediction_type == "epsilon" and parts.name == tiny_sd1.name
    out = save_folder(parts, tmp_path / "saved")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ours = parts.unet(x, t, ctx)
        ref = pipe.unet(x, t, ctx).sample
        assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
        ids = parts.tokenizer(["a red cube"], padding="max_length", return_tensors="pt").input_ids
        assert torch.equal(parts.text_encoder(ids)[0], pipe.text_encoder(ids)[0])
    ref_ids = pipe.tokenizer(["a red cube"], padding="max_length", return_tensors="pt").input_ids
    assert torch.equal(ref_ids, ids)
    tokenizer_json = out / "tokenizer" / "tokenizer.json"  # written without indentation
    assert not tokenizer_json.exists() or tokenizer_json.read_text().count("\n") == 1
    ref_vae = dict(pipe.vae.state_dict())
    assert all(torch.equal(v, ref_vae[k]) for k, v in parts.vae.state_dict().items())
    assert pipe.scheduler.config.steps_offset == 1
    assert not list(tmp_path.glob(".*"))  # the temp folder was renamed away


def test_fp16_save_and_load(tiny_sd2, tmp_path):
    from safetensors import safe_open

    parts = load_folder(tiny_sd2)
    save_folder(parts, tmp_path / "half", dtype="fp16")
    with safe_open(tmp_path / "half/unet/diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "F16"
    half = load_folder(tmp_path / "half", dtype=torch.bfloat16, prediction_type="eps")
    assert next(half.unet.parameters()).dtype == torch.bfloat16
    assert half.prediction_type == "epsilon" and parts.prediction_type == "v_prediction"


def test_folder_errors_name_the_path(tmp_path, tiny_sd1):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_folder(tmp_path / "nothing")
    partial = tmp_path / "partial"
    (partial / "scheduler").mkdir(parents=True)
    (partial / "scheduler/scheduler_config.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        load_folder(partial)
    assert str(partial / "unet" / "config.json") in _one_line(e.value)
    parts = load_folder(tiny_sd1)
    save_folder(parts, tmp_path / "once")
    with pytest.raises(CheckpointError, match="already exists"):
        save_folder(parts, tmp_path / "once")


def test_failed_save_leaves_nothing(tiny_sd1, tmp_path, monkeypatch):
    import ldm.formats.diffusers_folder as folder

    parts = load_folder(tiny_sd1)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(folder, "_write_json", broken)
    with pytest.raises(OSError):
        save_folder(parts, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- ldm convert


def _convert(capsys, *argv) -> tuple[int, str]:
    from ldm.cli import main

    code = main(["convert", *map(str, argv)])
    return code, capsys.readouterr().err.strip()


def test_cli_errors_are_one_line(tmp_path, capsys):
    evil = tmp_path / "evil.ckpt"
    torch.save({"x": _Payload(tmp_path / "canary")}, evil)
    cut = tmp_path / "cut.safetensors"
    save_state_dict({"w": torch.randn(32, 32)}, cut)
    cut.write_bytes(cut.read_bytes()[:100])
    cases = [
        (tmp_path / "missing.safetensors", "no such file"),
        (evil, "full unpickling"),
        (cut, "truncated"),
    ]
    for src, words in cases:
        code, err = _convert(capsys, src, tmp_path / "dst", "--to", "diffusers")
        assert code == 2 and err.startswith("ldm: error:") and words in err
        assert "\n" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.safetensors", "evil.ckpt"]


def test_cli_refuses_wrong_destination(tiny_sd1, tmp_path, capsys):
    code, err = _convert(capsys, tiny_sd1, tmp_path / "x.ckpt", "--to", "single-file")
    assert code == 2 and ".safetensors" in err
    code, err = _convert(capsys, tiny_sd1, tiny_sd1, "--to", "diffusers")
    assert code == 2 and "already exists" in err


def test_script_wrapper_exit_code(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    args = [sys.executable, str(root / "scripts/convert.py"), str(tmp_path / "nope"), "out"]
    proc = subprocess.run([*args, "--to", "diffusers"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr


def test_load_into_names_bad_weights():
    from ldm.formats.safe_load import load_into

    model = torch.nn.Linear(3, 2)
    cases = [
        ({"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, "shape"),
        ({"weight": torch.zeros(2, 3, dtype=torch.int64), "bias": torch.zeros(2)}, "dtype"),
        ({"weight": torch.zeros(2, 3)}, "missing weights.*bias"),
        ({"weight": torch.zeros(2, 3), "bias": torch.zeros(2), "x": torch.zeros(1)}, "unexpected"),
    ]
    for state_dict, words in cases:
        with pytest.raises(CheckpointError, match=f"m.safetensors: .*{words}"):
            load_into(model, state_dict, "m.safetensors")
