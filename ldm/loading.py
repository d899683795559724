"""Where a pipeline's model comes from: device and dtype, loading, identity, a stand-in.

``load_parts`` reads a diffusers folder or an original single file; ``model_hash`` is A1111's
"Model hash", cached because hashing gigabytes takes seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ldm.errors import CheckpointError, LdmError
from ldm.io import atomic_write_text

DEFAULT_MODEL = Path(__file__).parent / "assets" / "shapes-demo"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise LdmError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_parts(model: str | Path, device: torch.device, dtype: torch.dtype):
    """A diffusers folder or an original single file (.safetensors/.ckpt) -> ModelParts."""
    from ldm.formats.diffusers_folder import load_model

    path = Path(model)
    if not path.exists():
        raise CheckpointError(f"--model {model}: no such file or folder")
    if path.is_file() and path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"--model {model}: expected a diffusers folder or .safetensors/.ckpt")
    return load_model(path, device=device, dtype=dtype)


WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")
_HASHES: dict[str, str] = {}


def model_hash(path: str | Path) -> str:
    """A1111's "Model hash" (``ldm.infotext.model_hash``), cached across runs.

    Hashing gigabytes takes seconds, so results are kept in memory and in
    ``~/.cache/ldm/model_hashes.json`` keyed by path, size and mtime of the weight files.
    """
    from ldm.infotext import model_hash as sha256_10

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
