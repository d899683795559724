"""A labelled grid per prompt entry, like A1111's X/Y plot: columns = the first sweep (or the
seeds when there is no sweep), rows = the other sweeps and the seeds."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image, ImageDraw

from ldm.batch import manifest
from ldm.batch.jobs import Job
from ldm.batch.names import grid_name, inside
from ldm.batch.run import job_name
from ldm.infotext import save_png

LABEL_HEIGHT = 14  # pixels per line of label text (PIL's default bitmap font is ~11 px high)


def _by_entry(jobs: Iterable[Job]) -> Iterator[list[Job]]:
    """Consecutive jobs of the same entry (iter_jobs yields an entry's jobs together)."""
    for _, group in itertools.groupby(jobs, key=lambda j: j.entry):
        yield list(group)


def _label(pairs) -> str:
    return ", ".join(f"{k}={v}" for k, v in pairs)


def _axes(jobs: list[Job]) -> tuple[list, list, dict]:
    """(column labels, row labels, {(col, row): job})."""
    cols, rows, cells = [], [], {}
    for job in jobs:
        seed = ("seed", job.params["seed"])
        col = job.axes[:1] or (seed,)
        row = job.axes[1:] + ((seed,) if job.axes else ())
        col, row = _label(col), _label(row)
        cols += [col] if col not in cols else []
        rows += [row] if row not in rows else []
        cells[col, row] = job
    return cols, rows, cells


def _open(path: Path):
    with Image.open(path) as image:
        return image.convert("RGB")


def make_grid(jobs: list[Job], outdir: Path):
    """The labelled grid image of one entry's images (read back from ``outdir``)."""
    cols, rows, cells = _axes(jobs)
    images = {key: _open(inside(outdir, job_name(job))) for key, job in cells.items()}
    w, h = next(iter(images.values())).size
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    left = int(max(measure(r) for r in rows)) + 8 if any(rows) else 0
    pitch = max(w, int(max(measure(c) for c in cols)) + 8)  # labels never overlap
    top = LABEL_HEIGHT + 6
    grid = Image.new("RGB", (left + pitch * len(cols), top + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, col in enumerate(cols):
        draw.text((left + c * pitch + 4, 3), col, fill="black")
    for r, row in enumerate(rows):
        draw.text((4, top + r * h + 4), row, fill="black")
        for c, col in enumerate(cols):
            if (col, row) in images:
                grid.paste(images[col, row], (left + c * pitch, top + r * h))
    return grid


def write_grids(jobs: Iterable[Job], outdir: str | Path) -> list[Path]:
    """Grids of entries with several images, all finished; existing grids are kept."""
    outdir = Path(outdir)
    finished = {n for n, e in manifest.read(outdir).items() if e.get("status") == "ok"}
    written = []
    for group in _by_entry(jobs):
        if len(group) < 2 or any(job_name(j) not in finished for j in group):
            continue
        path = inside(outdir, f"grids/{grid_name(group[0].entry, group[0].params['prompt'])}")
        if path.exists():
            continue
        grid = make_grid(group, outdir)
        text = f"grid of {len(group)} images: " + ", ".join(job_name(j) for j in group)
        save_png(grid, path, text, {"grid": [job_name(j) for j in group]})
        written.append(path)
    return written
