"""Where a model comes from: device and dtype, loading (a name, folder or file, decided here
once; a folder's ``ldm_model.json`` may make it a LoRA on a base model, see
``ldm.models.bundled``), identity (A1111's "Model hash", cached because hashing gigabytes takes
seconds, and its "Lora hashes")."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ldm.dtypes import to_dtype
from ldm.errors import CheckpointError, LdmError
from ldm.formats.diffusers_folder import load_folder
from ldm.formats.lora import apply_lora
from ldm.formats.single_file import load_single_file
from ldm.infotext import model_hash as sha256_10
from ldm.io import atomic_write_text
from ldm.models.bundled import BUNDLED_DIR, DEFAULT_NAME, Manifest, read_manifest, resolve_model
from ldm.models.parts import ModelParts

DEFAULT_MODEL = BUNDLED_DIR / DEFAULT_NAME


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
    model: str | os.PathLike | None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    config: str | os.PathLike | dict | None = None,
    prediction_type: str | None = None,
    t5: bool = True,  # False: leave SD3's T5-XXL unread (zeros in its place)
) -> ModelParts:
    """A diffusers folder, an original single file (.safetensors / weights-only .ckpt), or a
    bundled model's name (None: the default one); names resolve by ``resolve_model``.

    ``config`` (a diffusers folder, a model YAML or a dict) and ``prediction_type`` say what a
    single file's keys cannot; a folder has its own configs, and its ``ldm_model.json`` the
    sampling defaults stored with it (``ModelParts.defaults``) or a LoRA to merge into a base.
    """
    path = resolve_model(model)
    if path.is_dir():
        if config is not None:
            raise LdmError("--config applies to a single file (a folder has its own configs)")
        manifest = read_manifest(path)
        if manifest is not None and manifest.kind == "lora":
            return _load_lora_model(manifest, device, dtype, prediction_type)
        parts = load_folder(path, device, dtype, prediction_type=prediction_type, t5=t5)
        if manifest is not None:
            parts.defaults = {**parts.defaults, **manifest.defaults}
        return parts
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"--model {model}: expected a diffusers folder or .safetensors/.ckpt")
    return load_single_file(
        path, device, dtype, config=config, prediction_type=prediction_type, t5=t5
    )


def _load_lora_model(manifest: Manifest, device, dtype, prediction_type) -> ModelParts:
    """Kind "lora": the base model with the LoRA merged; its defaults over the base's.

    The parts keep the base's path and name, so the records say what A1111 writes for a LoRA on
    a checkpoint: the base as "Model" / "Model hash", the LoRA in ``loras`` ("Lora hashes").
    """
    parts = load_model(manifest.base_path(), device, dtype, prediction_type=prediction_type)
    report = apply_lora(parts, manifest.lora, manifest.lora_scale)
    if report.warning():  # a model's own LoRA must fit its base entirely
        raise CheckpointError(f"{manifest.path}: {report.warning()}")
    parts.defaults = {**parts.defaults, **manifest.defaults}
    record = lora_record(manifest.lora, manifest.lora_scale, name=manifest.folder.name)
    parts.loras = [*parts.loras, record]  # Pipeline starts its records' LoRA list from these
    return parts


def lora_record(path: str | os.PathLike, scale: float, name: str | None = None) -> dict:
    """A merged LoRA as the image records list it (A1111 "Lora hashes" name: hash)."""
    path = Path(path)
    return {"name": name or path.stem, "scale": scale, "hash": lora_hash(path),
            "path": str(path.resolve())}  # fmt: skip


WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")
_HASHES: dict[str, str] = {}


def model_hash(path: str | Path) -> str:
    """A1111's "Model hash" (``ldm.infotext.model_hash``), cached across runs.

    Hashing gigabytes takes seconds, so results are kept in memory and in
    ``~/.cache/ldm/model_hashes.json`` keyed by path, size and mtime of the weight files.
    """
    path = Path(path).resolve()
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is not None and manifest.kind == "lora":
        return model_hash(manifest.base_path())  # the checkpoint's; the LoRA's is "Lora hashes"
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


def lora_hash(path: str | Path) -> str:
    """A1111's LoRA short hash: 12 hex of the sha256 of a .safetensors file's tensor bytes (the
    "addnet" hash, header skipped, so editing metadata keeps it), of the whole file otherwise."""
    path = Path(path).resolve()
    key = json.dumps(["lora", str(path), *_stat(path)])
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            if path.suffix.lower() == ".safetensors":
                f.seek(8 + int.from_bytes(f.read(8), "little"))  # u64 header length, header
            while block := f.read(1 << 20):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()[:12]
    return _HASHES[key]


def _stat(f: Path) -> tuple[int, int]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm"
