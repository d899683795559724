"""Where the shapes world puts its objects: the placement rules and the two layouts.

``place`` draws boxes one at a time from 64 vectorised candidates, keeping boxes ``MIN_GAP``
apart and, for the position task, the relation true by ``MIN_OFFSET``. ``"random"`` draws the
candidates anywhere in the image (the world's own distribution, which evaluation uses);
``"tidy"`` draws each object's candidates inside a cell that its caption gives (``cells``), a
training distribution whose layout the caption determines (docs/shapes.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ldm.errors import LdmError

if TYPE_CHECKING:
    from ldm.data.shapes import Prompt

SIZE = 64  # image side in pixels
MIN_GAP = 2  # objects' bounding boxes are at least this far apart
MIN_OFFSET = 16  # position task: centre offset along the named axis (and < this across it)


def _relation_ok(a: np.ndarray, b: np.ndarray, relation: str) -> np.ndarray:
    """Centre offsets (N, 2) of a and b satisfy "a <relation> b" as the world defines it."""
    dx, dy = (b - a).T  # image y grows downwards
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx)}.get(
        relation, (-dy, dx)
    )
    return (along >= MIN_OFFSET) & (np.abs(across) < MIN_OFFSET)


# "tidy" layouts: each object is placed uniformly inside a cell (x0, y0, x1, y1) that its task
# and its place in the caption give; the 1-px inset keeps boxes in neighbouring cells MIN_GAP apart.
_H = SIZE // 2
_LEFT, _RIGHT, _TOP, _BOTTOM = (
    (0, 0, _H, SIZE),
    (_H, 0, SIZE, SIZE),
    (0, 0, SIZE, _H),
    (0, _H, SIZE, SIZE),
)
_QUADRANTS = [(0, 0, _H, _H), (_H, 0, SIZE, _H), (0, _H, _H, SIZE), (_H, _H, SIZE, SIZE)]
_TIDY_CELLS = {
    "left of": [_LEFT, _RIGHT], "right of": [_RIGHT, _LEFT],
    "above": [_TOP, _BOTTOM], "below": [_BOTTOM, _TOP],
    2: [_LEFT, _RIGHT], 3: [_QUADRANTS[0], _QUADRANTS[1], (_H // 2, _H, SIZE - _H // 2, SIZE)],
    4: _QUADRANTS,
}  # fmt: skip
LAYOUTS = ("random", "tidy")


def check_layout(layout: str) -> str:
    """``layout`` itself if it is one of ``LAYOUTS``; a clear error otherwise."""
    if layout not in LAYOUTS:
        raise LdmError(f"unknown shapes layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    return layout


def cells(prompt: Prompt, layout: str) -> list | None:
    """Per-object cells of a tidy layout (None: anywhere in the image)."""
    check_layout(layout)
    n = sum(item.count for item in prompt.items)
    if layout == "random" or n == 1:
        return None
    return _TIDY_CELLS[prompt.relation or n]  # in caption order: left to right, top to bottom


def place(
    rng: np.random.Generator, sizes: list[int], relation: str | None, cells: list | None = None
) -> list | None:
    """Place boxes one by one (64 vectorised candidates each); None if one does not fit."""
    placed: list[tuple[int, int, int]] = []
    for i, s in enumerate(sizes):
        if cells is None:
            xy = rng.integers(0, SIZE - s + 1, size=(64, 2))
        else:
            x0, y0, x1, y1 = cells[i]
            xy = rng.integers((x0 + 1, y0 + 1), (x1 - s, y1 - s), size=(64, 2), endpoint=True)
        ok = np.ones(len(xy), dtype=bool)
        for px, py, ps in placed:  # bounding boxes at least MIN_GAP apart on some axis
            apart_x = (xy[:, 0] + s + MIN_GAP <= px) | (px + ps + MIN_GAP <= xy[:, 0])
            apart_y = (xy[:, 1] + s + MIN_GAP <= py) | (py + ps + MIN_GAP <= xy[:, 1])
            ok &= apart_x | apart_y
        if relation and placed:
            px, py, ps = placed[0]
            first = np.array([[px + ps / 2, py + ps / 2]])
            ok &= _relation_ok(first, xy + s / 2, relation)
        if not ok.any():
            return None
        x, y = xy[int(np.argmax(ok))]
        placed.append((int(x), int(y), s))
    return placed
