"""Output names made from prompts: deterministic, and safe on every filesystem.

A name is ``<index>-<slug>-<seed>.png``: the job index (unique within a run, so two prompts that
reduce to the same slug never collide), a short ASCII slug of the prompt, and the seed. The slug
keeps only ``[a-z0-9-]``, so path separators, ``..``, control characters, Windows reserved names
(CON, NUL, COM1, ... are never the whole stem because the name starts with digits) and 300-byte
emoji prompts cannot reach the filesystem; names stay far below the 255-byte limit.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

from ldm.errors import LdmError

SLUG_LENGTH = 32
INDEX_DIGITS = 6  # 000042; longer indices simply use more digits
_NOT_SLUG = re.compile(r"[^a-z0-9]+")


def slugify(text: str, length: int = SLUG_LENGTH) -> str:
    """A short lower-case ASCII slug: accents folded (NFKD), everything else becomes '-'."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = _NOT_SLUG.sub("-", ascii_text.lower()).strip("-")
    return slug[:length].rstrip("-") or "image"


def image_name(index: int, prompt: str, seed: int, suffix: str = ".png") -> str:
    """The file name of job ``index``: ``000042-a-red-cube-1234.png``."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got {index}, {seed}")
    return f"{index:0{INDEX_DIGITS}d}-{slugify(prompt)}-{seed}{suffix}"


def grid_name(entry: int, prompt: str) -> str:
    """The file name of the grid of prompt entry ``entry`` (under ``grids/``)."""
    return f"{entry:0{INDEX_DIGITS}d}-{slugify(prompt)}-grid.png"


def inside(outdir: str | os.PathLike, name: str) -> Path:
    """``outdir / name``, refusing any name that would resolve outside ``outdir``."""
    root = Path(outdir).resolve()
    path = (root / name).resolve()
    if path == root or root not in path.parents:
        raise LdmError(f"output name {name!r} would be written outside --outdir {outdir}")
    return path
