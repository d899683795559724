"""Where the server's images go: PNGs written as ``ldm txt2img`` writes them, and an index by name.

Each image is saved with the CLI's infotext and JSON record (``ldm.infotext.save_png``), so the
bytes a client receives equal the file ``ldm txt2img`` writes for the same settings. ComfyUI's
``/view`` serves only names in this index: a name the server made, never a path.
"""

from __future__ import annotations

import base64
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ldm.batch.names import image_name, inside
from ldm.infotext import infotext_from_record, save_png


@dataclass
class OutputImage:
    name: str  # file name in the output folder (and the ComfyUI /view filename)
    data: bytes  # the PNG file's bytes
    record: dict  # the JSON record in the PNG (the CLI's)
    infotext: str  # the A1111 parameters text in the PNG

    @property
    def b64(self) -> str:
        """Raw base64, no ``data:`` prefix (as A1111 and OpenAI return images)."""
        return base64.b64encode(self.data).decode("ascii")


class OutputIndex:
    """Saves images under ``outdir`` with fresh numbered names; looks them up by name."""

    def __init__(self, outdir: str | Path):
        self.outdir = Path(outdir)
        self._paths: dict[str, Path] = {}
        self._lock = threading.Lock()
        numbers = [0]
        if self.outdir.is_dir():  # never overwrite the images of an earlier server run
            numbers += [int(m.group(1)) + 1 for p in self.outdir.iterdir()
                        if (m := re.match(r"(\d+)-", p.name))]  # fmt: skip
        self._next = max(numbers)

    def save(self, image, record: dict) -> OutputImage:
        with self._lock:
            index, self._next = self._next, self._next + 1
        name = image_name(index, record["prompt"], int(record["seed"]))
        path = inside(self.outdir, name)
        infotext = infotext_from_record(record)
        save_png(image, path, infotext, record)
        data = path.read_bytes()
        with self._lock:
            self._paths[name] = path
        return OutputImage(name, data, record, infotext)

    def path(self, name: str) -> Path | None:
        """The file of an image this server made, or None (names only; no path is accepted)."""
        with self._lock:
            return self._paths.get(name)
