"""Model configs as diffusers' ``config.json``: one reader and writer for every network's
dataclass config (U-Net, VAE, SD3 and FLUX transformers)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

from ldm.errors import ConfigError


def is_default(value: Any, default: Any) -> bool:
    """A config value equal to ldm's only supported one (a per-block list of it counts)."""
    if isinstance(value, (list, tuple)) and not isinstance(default, (list, tuple)):
        return all(v == default for v in value)  # e.g. only_cross_attention: [false, false, ...]
    return value == default


class DiffusersConfig:
    """Mixin for a dataclass config: ``from_diffusers`` reads a diffusers config dict (unknown
    fields, and supported-only-at-default fields set otherwise, raise by name) and
    ``to_diffusers`` writes one that diffusers' class accepts."""

    class_name: ClassVar[str] = ""  # diffusers' class, written as _class_name
    where: ClassVar[str] = "config"  # how errors name the file ("unet config")
    unsupported: ClassVar[dict[str, Any]] = {}  # diffusers fields ldm supports at one value

    @classmethod
    def from_diffusers(cls, d: dict) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key.startswith("_"):
                continue  # _class_name, _diffusers_version, _name_or_path
            if key in names:
                kwargs[key] = value
            elif key in cls.unsupported:
                if not is_default(value, cls.unsupported[key]):
                    raise ConfigError(f"{cls.where}: {key}={value!r} is not supported by ldm")
            else:
                raise ConfigError(f"{cls.where}: unknown field {key!r}")
        return cls(**kwargs)

    def to_diffusers(self) -> dict:
        out: dict[str, Any] = {"_class_name": self.class_name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out
