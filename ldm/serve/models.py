"""The models a server was started with, by name; one is loaded at a time (by the worker).

Clients choose among these names only (A1111 ``sd_model_checkpoint``, ComfyUI ``ckpt_name``,
OpenAI ``model``): no route takes a path. A1111 titles a model ``name [hash]``.
"""

from __future__ import annotations

import threading
from pathlib import Path

from ldm.errors import LdmError


class ModelTable:
    """Names -> model paths (None: the bundled demo model; bundled names resolve as ``--model``
    does, ``ldm.models.bundled``); the selected and the loaded one."""

    def __init__(self, models: list[str | None], device=None, dtype=None, accel=None):
        from ldm.models.bundled import resolve_model

        self.paths: dict[str, Path] = {}
        for model in models or [None]:
            path = resolve_model(model)  # a path, or a bundled model's name
            name = path.stem if path.is_file() else path.name
            if name in self.paths:
                raise LdmError(f"--model {model}: two models are named {name!r}")
            self.paths[name] = path
        self.device, self.dtype, self.accel = device, dtype, accel
        self.selected = next(iter(self.paths))  # what a request without a model uses
        self._loaded: tuple[str, object] | None = None
        self._lock = threading.Lock()
        self._hashes: dict[str, str] = {}

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def hash(self, name: str) -> str:
        if name not in self._hashes:
            from ldm.loading import model_hash

            self._hashes[name] = model_hash(self.paths[name])
        return self._hashes[name]

    def title(self, name: str) -> str:
        return f"{name} [{self.hash(name)}]"

    def resolve(self, wanted: str | None, what: str = "model") -> str:
        """A name, A1111 title or file name (any case) -> the name; unknown ones are an error."""
        if wanted is None or wanted == "":
            return self.selected
        key = wanted.strip().lower()
        for name, path in self.paths.items():
            if key in (name.lower(), self.title(name).lower(), path.name.lower()):
                return name
        raise LdmError(f"unknown {what} {wanted!r}; this server has: {', '.join(self.names)}")

    def select(self, wanted: str) -> str:
        self.selected = self.resolve(wanted, "sd_model_checkpoint")
        return self.selected

    def loaded(self, name: str):
        """The pipeline of ``name`` when it is the loaded one (for early checks), else None."""
        loaded = self._loaded
        return loaded[1] if loaded is not None and loaded[0] == name else None

    def pipeline(self, name: str):
        """The pipeline of ``name``, loading it (and dropping the other) if needed."""
        with self._lock:
            if self._loaded is not None and self._loaded[0] == name:
                return self._loaded[1]
            from ldm.pipeline import load_pipeline

            self._loaded = None  # free the old model before loading the next
            path = self.paths[name]
            model = None if path == _default() else path
            pipe = load_pipeline(model, device=self.device, dtype=self.dtype, accel=self.accel)
            pipe.accelerate()
            self._loaded = (name, pipe)
            return pipe


def _default() -> Path:
    from ldm.loading import DEFAULT_MODEL

    return DEFAULT_MODEL
