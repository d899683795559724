"""``manifest.jsonl``: one line per finished (or failed) image, the ground truth for resuming.

A line is appended and fsynced only after its image was renamed into place (see
:func:`ldm.io.atomic_path`), so the manifest never lists an image that is not complete on disk.
Lines are written with one ``write`` on an ``O_APPEND`` descriptor: processes of a sharded run
share the file without locks (POSIX appends to a local file do not interleave), and a line torn
by a crash is ignored on reading and cut off by :func:`repair`. One output has one line: runs on
one folder claim batches (ldm.batch.lock), a writer never appends a name twice, the reader keeps
the last line of a name, and :func:`compact` rewrites the file (atomically) when no one appends.

On a re-run each job is ``done`` (manifest line with the same parameters, file present, sha256
equal), ``adopt`` (the file is complete but its line was lost: the process died between the rename
and the append; its embedded record matches the job), or ``todo``. A file under a job's name that
belongs to another job is never overwritten: the run refuses to start.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ldm.errors import LdmError
from ldm.infotext import read_png_metadata
from ldm.io import atomic_path

MANIFEST = "manifest.jsonl"
# record keys that must equal the job's parameters for an unlisted file to be adopted
_RECORD_KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "guidance_rescale",
                "sampler", "schedule", "width", "height", "clip_skip", "shift",
                "true_cfg_scale")  # fmt: skip


def read(outdir: str | Path) -> dict[str, dict]:
    """name -> the last manifest line about it (torn or foreign lines are skipped)."""
    tail = Tail(outdir)
    tail.update(final=True)
    return tail.entries


def _parse(raw: bytes) -> dict | None:
    try:
        entry = json.loads(raw)
    except ValueError:
        return None  # a line torn by a crash: its image is re-checked from the file
    return entry if isinstance(entry, dict) and isinstance(entry.get("name"), str) else None


class Tail:
    """The manifest read incrementally: ``update()`` adds the lines appended since the last call
    (by this or other processes) to ``entries``; a line still being written waits for its
    newline."""

    def __init__(self, outdir: str | Path):
        self.path = Path(outdir) / MANIFEST
        self.entries: dict[str, dict] = {}
        self.offset = 0

    def update(self, final: bool = False) -> dict[str, dict]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return self.entries
        with f:
            if os.fstat(f.fileno()).st_size < self.offset:  # compacted: read it again
                self.entries, self.offset = {}, 0
            f.seek(self.offset)
            for raw in f:
                if not raw.endswith(b"\n") and not final:
                    break  # not complete yet (or torn: repair cuts it)
                self.offset += len(raw)
                entry = _parse(raw)
                if entry is not None:
                    self.entries[entry["name"]] = entry
        return self.entries


def compact(outdir: str | Path) -> bool:
    """Keep the last line of each name (and drop torn ones), rewritten atomically; only when no
    process appends (see ldm.batch.lock). True if the file changed."""
    path = Path(outdir) / MANIFEST
    if not path.exists():
        return False
    kept: dict[str, bytes] = {}
    other: list[bytes] = []  # valid JSON lines without a name: not ours to drop
    total = 0
    with open(path, "rb") as f:
        for raw in f:
            total += 1
            entry = _parse(raw)
            if entry is not None:
                kept.pop(entry["name"], None)  # the last line of a name keeps its place
                kept[entry["name"]] = raw if raw.endswith(b"\n") else raw + b"\n"
            elif raw.strip() and _is_json(raw):
                other.append(raw if raw.endswith(b"\n") else raw + b"\n")
    if len(kept) + len(other) == total:
        return False
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"".join(other) + b"".join(kept.values()))
    return True


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
        return True
    except ValueError:
        return False


def repair(outdir: str | Path) -> None:
    """Cut a torn last line (no newline) so the next append starts a line of its own."""
    path = Path(outdir) / MANIFEST
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        cut, stop = 0, end  # cut: the end of the last complete line, searched backwards
        while stop > 0:
            start = max(0, stop - (1 << 20))
            f.seek(start)
            newline = f.read(stop - start).rfind(b"\n")
            if newline >= 0:
                cut = start + newline + 1
                break
            stop = start
        f.truncate(cut)
        os.fsync(f.fileno())


def clean_temp_files(outdir: str | Path) -> int:
    """Remove temp files left by a killed run (``.<name>.<random>.tmp`` from ldm.io)."""
    removed = 0
    for sub in (Path(outdir), Path(outdir) / "grids"):
        if sub.is_dir():
            for p in sub.glob(".*.png.*.tmp"):
                p.unlink(missing_ok=True)
                removed += 1
    return removed


class Writer:
    """Appends manifest lines: one ``write`` + ``fsync`` each, on an ``O_APPEND`` descriptor."""

    def __init__(self, outdir: str | Path):
        path = Path(outdir) / MANIFEST
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.names: set[str] = set()

    def append(self, entry: dict) -> bool:
        """Append a line; False (nothing written) if this writer already wrote its name."""
        if entry["name"] in self.names:
            return False
        line = json.dumps(entry, ensure_ascii=True, sort_keys=True) + "\n"
        os.write(self.fd, line.encode("ascii"))
        os.fsync(self.fd)
        self.names.add(entry["name"])
        return True

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def status(name: str, params: dict, path: Path, entry: dict | None, model_hash: str) -> str:
    """ "done", "adopt" or "todo" for one job; LdmError if its name holds another job's file."""
    if entry is not None and entry.get("params") != params:
        raise LdmError(
            f"{path}: the manifest lists this name for other parameters (line or flags changed "
            "since the last run?); use a new --outdir"
        )
    ok = entry is not None and entry.get("status") == "ok"
    if ok and path.is_file() and file_sha256(path) == entry.get("sha256"):
        return "done"
    if ok or not path.exists():
        return "todo"  # listed but missing or corrupted: made again, same bytes
    if _is_image_of(path, params, model_hash):
        return "adopt"
    raise LdmError(f"{path} exists and is not an image of this job: refusing to overwrite it")


def _is_image_of(path: Path, params: dict, model_hash: str) -> bool:
    """Whether an unlisted file carries this job's record (written, then the process died)."""
    try:
        _, record = read_png_metadata(path)
    except LdmError:
        return False
    if not isinstance(record, dict) or record.get("model_hash") != model_hash:
        return False
    if params.get("eta") is not None and record.get("eta") != params["eta"]:
        return False
    return all(record.get(k) == params[k] for k in _RECORD_KEYS if params.get(k) is not None)
