"""Image-caption sources in the common layouts, each a random-access list of ``Sample``s.

Layouts (``open_source`` detects them): Hugging Face imagefolder (``metadata.jsonl`` with
``file_name`` + ``text``/``caption``, or ``metadata.csv``), kohya-style sidecars (``a.png`` +
``a.txt``/``a.caption``), a CSV file (``image,caption`` or ``file_name,text``), webdataset tar
shards (``key.jpg`` + ``key.txt``; uncompressed, read in place by offset, never extracted), and the
built-in shapes world stream (``"shapes"`` or ``"shapes:SEED"``).
"""

from __future__ import annotations

import csv
import json
import re
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ldm.data.images import ImageData
from ldm.data.shapes import ShapesDataset
from ldm.errors import LdmError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTS = (".txt", ".caption")
IMAGE_COLUMNS = ("file_name", "image", "file", "path")
CAPTION_COLUMNS = ("text", "caption")


@dataclass(frozen=True)
class Sample:
    """One image-caption pair. ``caption`` None means missing; ``load()`` returns the raw image.

    key: stable unique string (relative path, ``shard/key`` or the shapes index);
    path: where it lives, for the skip list; size: (W, H) when known without decoding;
    file: the image file on disk, when there is one (lets the scan read headers only).
    """

    key: str
    caption: str | None
    path: str
    load: Callable[[], ImageData]
    size: tuple[int, int] | None = None
    file: Path | None = None


class Source(Sequence):
    """A finite, stably ordered list of samples (``endless`` sources are indexed forever)."""

    name: str = "source"
    endless: bool = False

    def __init__(self, samples: list[Sample], name: str):
        self.samples, self.name = samples, name

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


def _file_loader(path: Path) -> Callable[[], bytes]:
    return lambda: path.read_bytes()


def _read_caption(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip()


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTS


def _row_sample(root: Path, file_name: str, caption: str | None) -> Sample:
    """A sample from a metadata row; a listed file that is missing is kept (skipped later)."""
    path = (root / file_name) if not Path(file_name).is_absolute() else Path(file_name)
    key = Path(file_name).as_posix()

    def load() -> bytes:
        if not path.is_file():
            raise FileNotFoundError(path)
        return path.read_bytes()

    return Sample(key, caption, str(path), load, file=path)


def read_metadata_jsonl(path: Path) -> Source:
    """Hugging Face imagefolder: one JSON object per line with ``file_name`` and ``text``."""
    samples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LdmError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise LdmError(f"{path}:{n}: each line needs a 'file_name' field")
        caption = row.get("text", row.get("caption"))
        samples.append(_row_sample(path.parent, str(row["file_name"]), caption))
    return Source(samples, f"imagefolder:{path}")


def read_csv(path: Path) -> Source:
    """CSV with a header naming an image column and a caption column; paths relative to it."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        image_col = next((c for c in IMAGE_COLUMNS if c in fields), None)
        caption_col = next((c for c in CAPTION_COLUMNS if c in fields), None)
        if image_col is None or caption_col is None:
            raise LdmError(
                f"{path}: CSV header must name an image column {IMAGE_COLUMNS} and a caption "
                f"column {CAPTION_COLUMNS}, got {fields}"
            )
        reader.fieldnames = fields
        samples = [
            _row_sample(path.parent, row[image_col], row.get(caption_col))
            for row in reader
            if row.get(image_col)
        ]
    return Source(samples, f"csv:{path}")


def read_sidecars(root: Path) -> Source:
    """kohya-style folder (searched recursively): each image with a ``.txt``/``.caption`` twin."""
    samples = []
    for image in sorted(p for p in root.rglob("*") if _is_image(p)):
        caption = None
        for ext in CAPTION_EXTS:
            side = image.with_suffix(ext)
            if side.is_file():
                caption = _read_caption(side)
                break
        key = image.relative_to(root).as_posix()
        samples.append(Sample(key, caption, str(image), _file_loader(image), file=image))
    return Source(samples, f"folder:{root}")


def _member_reader(shard: Path, offset: int, size: int) -> Callable[[], bytes]:
    def load() -> bytes:
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)

    return load


def read_tar_shards(shards: list[Path]) -> Source:
    """webdataset shards: members grouped by key (path up to the first dot of the basename).

    Only member headers are scanned; each image is later read by seeking to its offset, so
    shards are never extracted. Compressed shards cannot be seeked and are refused.
    """
    samples = []
    for shard in shards:
        if not shard.is_file():
            raise LdmError(f"{shard}: tar shard not found")
        if shard.suffix.lower() != ".tar":
            raise LdmError(f"{shard}: only uncompressed .tar shards are supported")
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    folder, _, base = info.name.rpartition("/")
                    stem, dot, ext = base.partition(".")
                    if not dot:
                        continue
                    key = f"{folder}/{stem}" if folder else stem
                    groups.setdefault(key, {})["." + ext.lower()] = info
        except tarfile.TarError as e:
            raise LdmError(f"{shard}: not a readable tar file ({e})") from None
        for key, members in groups.items():
            image = next((members[e] for e in IMAGE_EXTS if e in members), None)
            if image is None:
                continue
            text = next((members[e] for e in CAPTION_EXTS if e in members), None)
            caption = None
            if text is not None:
                raw = _member_reader(shard, text.offset_data, text.size)()
                caption = raw.decode("utf-8", errors="replace").strip()
            samples.append(
                Sample(
                    f"{shard.stem}/{key}",
                    caption,
                    f"{shard}:{image.name}",
                    _member_reader(shard, image.offset_data, image.size),
                )
            )
    return Source(samples, f"webdataset:{len(shards)} shards")


def expand_braces(pattern: str) -> list[str]:
    """webdataset brace patterns: ``shards-{000..009}.tar`` (zero-padded) and ``{a,b}``."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.groups()
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


class ShapesSource(Source):
    """The shapes world (``ldm.data.shapes.ShapesDataset``) as an endless source keyed by index."""

    endless = True

    def __init__(self, seed: int = 0, **kwargs):
        self.dataset = ShapesDataset(seed, **kwargs)
        self.seed, self.name = seed, f"shapes:{seed}"

    def __len__(self) -> int:
        raise TypeError("ShapesSource is endless; it has no length")

    def __getitem__(self, index: int) -> Sample:
        image, caption = self.dataset[index]
        size = (image.shape[1], image.shape[0]) if hasattr(image, "shape") else image.size
        return Sample(str(index), caption, f"shapes:{self.seed}:{index}", lambda: image, size)


def open_source(path: str | Path) -> Source:
    """Detect the layout of ``path`` and read it (see the module docstring for the layouts)."""
    text = str(path)
    if "{" in text and "}" in text:
        return read_tar_shards([Path(p) for p in expand_braces(text)])
    path = Path(path)
    if not path.exists():
        m = re.fullmatch(r"shapes(?::(\d+))?", text)
        if m:
            return ShapesSource(seed=int(m.group(1) or 0))
        raise LdmError(f"{path}: data source not found")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return read_csv(path)
        if suffix == ".jsonl":
            return read_metadata_jsonl(path)
        if suffix == ".tar":
            return read_tar_shards([path])
        raise LdmError(f"{path}: unknown data file type (expected .csv, .jsonl or .tar)")
    if (path / "metadata.jsonl").is_file():
        return read_metadata_jsonl(path / "metadata.jsonl")
    if (path / "metadata.csv").is_file():
        return read_csv(path / "metadata.csv")
    shards = sorted(path.glob("*.tar"))
    if shards and not any(_is_image(p) for p in path.iterdir()):
        return read_tar_shards(shards)
    source = read_sidecars(path)
    if len(source) == 0:
        raise LdmError(f"{path}: no images, metadata.jsonl, metadata.csv or .tar shards found")
    return source
