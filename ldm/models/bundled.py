"""Models by name: the folders under ``ldm/assets`` (``shapes-demo``, ``shapes-demo-lcm``) and
the ``ldm_model.json`` manifest any model folder may carry.

A manifest says what a folder's weights alone cannot: a LoRA to merge into a base model (kind
"lora"), and the sampling defaults stored with the model (an LCM student samples with "lcm, 4
steps, guidance 1"). Every ``--model`` is resolved by :func:`resolve_model`: an existing path
wins, else a bundled name, else a one-line error naming the bundled models.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ldm.errors import CheckpointError

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets"  # one folder per bundled model
DEFAULT_NAME = "shapes-demo"  # the model used when no --model is given
MANIFEST = "ldm_model.json"
# Pipeline.sampling_defaults', and the T5-block length of an SD3 model trained with a short one
DEFAULT_KEYS = ("sampler", "schedule", "steps", "guidance_scale", "eta", "max_sequence_length")
_KEYS = {
    "model": {"kind", "defaults", "description"},
    "lora": {"kind", "defaults", "description", "base", "lora", "lora_scale"},
}


@dataclass(frozen=True)
class Manifest:
    """A checked ``ldm_model.json``."""

    folder: Path  # the model folder that holds it
    kind: str  # "model": the folder's own weights; "lora": a LoRA file merged into ``base``
    defaults: dict = field(default_factory=dict)  # sampler, schedule, steps, guidance_scale
    description: str = ""
    base: str | None = None  # kind "lora": a path (relative to ``folder``) or a bundled name
    lora: Path | None = None  # kind "lora": the LoRA file (diffusers/PEFT or kohya keys)
    lora_scale: float = 1.0  # kind "lora": the merge scale, as ``--lora FILE:SCALE``

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST

    def base_path(self) -> Path:
        """The base model: a path (relative to the manifest's folder, never to the working
        directory) wins over a bundled name."""
        path = self.folder / self.base  # an absolute base stays itself
        if not path.exists():
            if self.base not in bundled_names():
                raise CheckpointError(
                    f"{self.path}: base {self.base!r} is neither a path (relative to the folder) "
                    f"nor a bundled model ({', '.join(bundled_names()) or 'none'})"
                )
            path = BUNDLED_DIR / self.base
        base = read_manifest(path) if path.is_dir() else None
        if base is not None and base.kind == "lora":
            raise CheckpointError(f"{self.path}: base {self.base!r} is itself a LoRA model; "
                                  "stack further LoRAs with --lora")  # fmt: skip
        return path


def bundled_names() -> list[str]:
    """Names of the bundled models: folders of ``BUNDLED_DIR`` with a model or a manifest."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(
        p.name
        for p in BUNDLED_DIR.iterdir()
        if p.is_dir() and ((p / "model_index.json").exists() or (p / MANIFEST).exists())
    )


def resolve_model(model: str | os.PathLike | None, flag: str = "--model") -> Path:
    """``--model`` -> a path: None is the default bundled model; an existing path wins over a
    bundled model of the same name (say ``./shapes-demo`` or ``shapes-demo`` accordingly)."""
    if model is None:
        return BUNDLED_DIR / DEFAULT_NAME
    path = Path(model)
    if path.exists():
        return path
    name = str(model)
    if name in bundled_names():  # a bare name: no separators, never "." or ".."
        return BUNDLED_DIR / name
    names = ", ".join(bundled_names()) or "none"
    raise CheckpointError(f"{flag} {model}: no such file, folder or bundled model ({names})")


def write_manifest(folder: str | os.PathLike, data: dict) -> Path:
    """Write a folder's ``ldm_model.json`` atomically (temp file, then rename)."""
    path = Path(folder) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(folder: str | os.PathLike) -> Manifest | None:
    """The folder's checked ``ldm_model.json``, or None without one (one-line errors)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    kind = data.get("kind", "model")
    if kind not in _KEYS:
        raise CheckpointError(f"{path}: unknown kind {kind!r}; expected 'lora' or 'model'")
    unknown = sorted(set(data) - _KEYS[kind])
    if unknown:
        hint = ' (a LoRA needs "kind": "lora")' if {"base", "lora"} & set(unknown) else ""
        allowed = ", ".join(sorted(_KEYS[kind]))
        raise CheckpointError(f"{path}: unknown key(s) {', '.join(unknown)} for kind {kind!r} "
                              f"(allowed: {allowed}){hint}")  # fmt: skip
    description = data.get("description", "")
    if not isinstance(description, str):
        raise CheckpointError(f"{path}: description must be a string")
    manifest = Manifest(folder, kind, check_defaults(data.get("defaults", {}), path), description)
    return manifest if kind == "model" else _lora_manifest(manifest, data, path)


def _lora_manifest(manifest: Manifest, data: dict, path: Path) -> Manifest:
    for key in ("base", "lora"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise CheckpointError(f"{path}: kind 'lora' needs {key!r} (a name or a path)")
    lora = manifest.folder / data["lora"]
    if not lora.is_file():
        raise CheckpointError(f"{path}: lora file {data['lora']!r} not found in {manifest.folder}")
    scale = data.get("lora_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise CheckpointError(f"{path}: lora_scale must be a finite number, got {scale!r}")
    return Manifest(manifest.folder, "lora", manifest.defaults, manifest.description,
                    data["base"], lora, float(scale))  # fmt: skip


def check_defaults(defaults, path: Path) -> dict:
    """The stored sampling defaults, each checked as its flag is (one-line errors)."""
    from ldm.errors import LdmError
    from ldm.request import check_sampler, check_schedule, check_stored_eta

    if not isinstance(defaults, dict):
        raise CheckpointError(f"{path}: defaults must be an object")
    unknown = sorted(set(defaults) - set(DEFAULT_KEYS))
    if unknown:
        raise CheckpointError(f"{path}: unknown default(s) {', '.join(unknown)} "
                              f"(allowed: {', '.join(DEFAULT_KEYS)})")  # fmt: skip
    steps, scale = defaults.get("steps"), defaults.get("guidance_scale")
    if steps is not None and (type(steps) is not int or steps < 1):
        raise CheckpointError(f"{path}: defaults.steps must be an integer >= 1, got {steps!r}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise CheckpointError(f"{path}: defaults.guidance_scale must be a number, got {scale!r}")
    length = defaults.get("max_sequence_length")
    if length is not None and (type(length) is not int or not 1 <= length <= 512):
        raise CheckpointError(f"{path}: defaults.max_sequence_length must be an integer in "
                              f"1..512, got {length!r}")  # fmt: skip
    try:
        for key in ("sampler", "schedule"):
            if key in defaults and not isinstance(defaults[key], str):
                raise LdmError(f"{key} must be a name, got {defaults[key]!r}")
        if "schedule" in defaults:
            check_schedule(defaults["schedule"])
        spec = None
        if "sampler" in defaults:
            spec, _ = check_sampler(defaults["sampler"], defaults.get("schedule", "default"))
        if "eta" in defaults:
            check_stored_eta(defaults["eta"], spec)
    except LdmError as e:
        raise CheckpointError(f"{path}: defaults: {e}") from None
    return dict(defaults)


def folder_size(path: Path) -> int:
    """Bytes on disk of a file or of every file under a folder (links not followed)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def describe(folder: str | os.PathLike) -> dict:
    """What ``ldm models`` lists for a model folder: kind, base, the sampling defaults it
    generates with, size on disk, description (configs and manifests are read, never weights)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    stored = manifest.defaults if manifest is not None else {}
    info = dict(name=folder.name, kind="model", base=None, path=str(folder))
    weights = folder
    if manifest is not None and manifest.kind == "lora":
        weights = manifest.base_path()
        base = read_manifest(weights) if weights.is_dir() else None
        stored = {**(base.defaults if base is not None else {}), **stored}
        inside = weights.resolve().parent == BUNDLED_DIR
        info.update(kind="lora", base=weights.name if inside else str(weights),
                    lora=manifest.lora.name, lora_scale=manifest.lora_scale)  # fmt: skip
    info["defaults"] = sampling_defaults(weights, stored)
    info["stored_defaults"] = dict(manifest.defaults) if manifest is not None else {}
    info["size_bytes"] = folder_size(folder)
    info["description"] = manifest.description if manifest is not None else ""
    return info


def sampling_defaults(weights: Path, stored: dict) -> dict:
    """The sampler, schedule, steps and guidance scale a model generates with by default: the
    stored ones over its family's (the family read from a diffusers folder's configs)."""
    from ldm.formats.diffusers_folder import DEFAULT_MODEL_INDEX, read_json
    from ldm.models import families

    if not weights.is_dir():  # a single file: its family needs its keys; say what is stored
        return dict(stored)
    index = weights / "model_index.json"
    index = read_json(index) if index.exists() else dict(DEFAULT_MODEL_INDEX)
    text = weights / "text_encoder" / "config.json"
    family = families.from_folder(index, read_json(text) if text.exists() else None, str(weights))
    network = weights / family.network_folder / "config.json"
    if family.unguided and network.exists():  # FLUX.1-schnell: its own defaults (load_folder's)
        family = family.for_network(read_json(network))
    config = read_json(weights / "scheduler" / "scheduler_config.json")
    return family.sampling_defaults(config, stored)
