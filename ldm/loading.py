"""Where a model comes from: device and dtype, loading (folder or file, decided here once),
identity (A1111's "Model hash", cached because hashing gigabytes takes seconds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ldm.dtypes import to_dtype
from ldm.errors import CheckpointError, LdmError
from ldm.formats.diffusers_folder import load_folder
from ldm.formats.single_file import load_single_file
from ldm.infotext import model_hash as sha256_10
from ldm.io import atomic_write_text
from ldm.models.parts import ModelParts

DEFAULT_MODEL = Path(__file__).parent / "assets" / "shapes-demo"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU; unknown or absent devices are errors."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise LdmError(f"--device {device!r} is not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LdmError("--device cuda requested but CUDA is not available")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA and fp32 on CPU unless asked; names are fp32, fp16, bf16."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return to_dtype(dtype)


def load_model(
    model: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    config: str | os.PathLike | dict | None = None,
    prediction_type: str | None = None,
) -> ModelParts:
    """A diffusers folder or an original single file (.safetensors / weights-only .ckpt).

    ``config`` (a diffusers folder, a model YAML or a dict) and ``prediction_type`` say what a
    single file's keys cannot; a folder has its own configs.
    """
    path = Path(model)
    if not path.exists():
        raise CheckpointError(f"--model {model}: no such file or folder")
    if path.is_dir():
        if config is not None:
            raise LdmError("--config applies to a single file (a folder has its own configs)")
        return load_folder(path, device, dtype, prediction_type=prediction_type)
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"--model {model}: expected a diffusers folder or .safetensors/.ckpt")
    return load_single_file(path, device, dtype, config=config, prediction_type=prediction_type)


WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")
_HASHES: dict[str, str] = {}


def model_hash(path: str | Path) -> str:
    """A1111's "Model hash" (``ldm.infotext.model_hash``), cached across runs.

    Hashing gigabytes takes seconds, so results are kept in memory and in
    ``~/.cache/ldm/model_hashes.json`` keyed by path, size and mtime of the weight files.
    """
    path = Path(path).resolve()
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    key = json.dumps([str(path)] + [[str(f), *_stat(f)] for f in files])
    if key in _HASHES:
        return _HASHES[key]
    cache_file = _cache_dir() / "model_hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = sha256_10(path)
        try:
            atomic_write_text(cache_file, json.dumps(cache, indent=0))
        except OSError:
            pass  # a read-only home only costs a re-hash next time
    _HASHES[key] = cache[key]
    return cache[key]


def _stat(f: Path) -> tuple[int, int]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm"
