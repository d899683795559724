"""The shapes judge: detect objects by geometry and score prompts GenEval-style (Ghosh et al. 2023).

Detection: pixels far from the background grey are split into 4-connected components; each is
grown 2 px into its faint anti-aliased/blurred rim, its colour is the palette entry whose
background-to-colour line best explains its pixels, per-pixel coverage alpha comes from that
line, and the shape follows from two coverage-weighted measures: skew = (centroid_y - box_centre_y)
/ height (apex-up triangle 1/6, symmetric shapes 0) and fill = area / (width * height) (square 1,
circle pi/4). Blur and JPEG move fill a lot but barely move skew's sign, and blur preserves
centroids and coverage sums, which keeps the judge stable on blurry model output.
Scoring: an image is correct when every clause of its prompt holds (exact count of each named
shape, named colours, relation by centres); objects of shapes the prompt does not name are
ignored unless ``strict``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from ldm.data.shapes import BACKGROUND, PALETTE, SIZE, Prompt, PromptError, parse_prompt

_BG = np.array(BACKGROUND, dtype=np.float32)
_COLOURS = list(PALETTE)
_DIRS = np.array([PALETTE[c] for c in _COLOURS], dtype=np.float32) - _BG  # (8, 3)
_DIRS_SQ = (_DIRS**2).sum(1)  # (8,)

SEED_DIST = 85.0  # RGB distance from the background that seeds a component (~1/2 coverage)
GROW = 2  # px a component grows into fainter pixels (anti-aliased / blurred rim)
RIM_DIST = 20.0  # faintest pixel a component grows into
MIN_AREA = 20.0  # coverage-weighted area below which a component is a speck, ignored
MAX_SIDE = 40.0  # wider or taller than this: not an object of the world (e.g. noise)
MAX_ASPECT = 1.6  # objects have square boxes; a longer blob is merged or malformed
MIN_PEAK = 0.7  # an object has a solid interior: some pixel at least this close to its colour
MAX_COLOUR_RMS = 45.0  # mean distance of a component's pixels from its colour line
# shape thresholds, measured on rendered shapes (clean, blurred up to sigma 2, JPEG down to q30):
# |skew| <= 0.04 for circles and squares, >= 0.06 for triangles; fill of circles 0.72-0.89,
# of squares 0.85-1.0, of triangles 0.51-0.97 (blur fills a small triangle's corners)
SKEW_TRIANGLE = 0.05
FILL_SQUARE = 0.885
FILL_CIRCLE = 0.6


@dataclass
class Detection:
    """One detected component; ``shape``/``colour`` None when not an object of the world."""

    shape: str | None
    colour: str | None
    cx: float
    cy: float
    width: float
    height: float
    area: float
    fill: float
    skew: float
    note: str = ""


@dataclass
class Verdict:
    """The judge's answer for one image and prompt."""

    correct: bool
    reason: str
    detections: list[Detection]

    def to_dict(self) -> dict:
        d = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(x).items()}
             for x in self.detections]  # fmt: skip
        return {"correct": self.correct, "reason": self.reason, "detections": d}


def _label(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels (0 = background, 1..K) by min-propagation + pointer jumping."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        m = lab.copy()
        np.minimum(m[1:], lab[:-1], out=m[1:])
        np.minimum(m[:-1], lab[1:], out=m[:-1])
        np.minimum(m[:, 1:], lab[:, :-1], out=m[:, 1:])
        np.minimum(m[:, :-1], lab[:, 1:], out=m[:, :-1])
        m[~mask] = big
        flat = m.ravel()  # each label is a pixel index of the same component with a smaller
        fg = flat < big  # label, so following it (pointer jumping) shortcuts long chains
        flat[fg] = flat[flat[fg]]
        flat[fg] = flat[flat[fg]]
        if np.array_equal(m, lab):
            break
        lab = m
    out = np.zeros(big, dtype=np.int32)
    _, inverse = np.unique(lab.ravel()[mask.ravel()], return_inverse=True)
    out[mask.ravel()] = inverse + 1
    return out.reshape(h, w)


def _grow(labels: np.ndarray, allowed: np.ndarray, steps: int) -> np.ndarray:
    """Let labels spread ``steps`` px into ``allowed`` unlabelled pixels (4-neighbourhood)."""
    for _ in range(steps):
        g = labels.copy()
        for src, dst in (
            (np.s_[:-1], np.s_[1:]),
            (np.s_[1:], np.s_[:-1]),
            (np.s_[:, :-1], np.s_[:, 1:]),
            (np.s_[:, 1:], np.s_[:, :-1]),
        ):
            np.maximum(g[dst], labels[src], out=g[dst])
        labels = np.where((labels == 0) & allowed, g, labels)
    return labels


def _measure(pix: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> Detection:
    """Colour, coverage and geometry of one component (pixels (k, 3) at rows ys, cols xs)."""
    d = pix - _BG  # (k, 3)
    alpha = np.clip(d @ _DIRS.T / _DIRS_SQ, 0.0, 1.0)  # (k, 8) coverage along each colour line
    resid = ((d[:, None, :] - alpha[:, :, None] * _DIRS[None]) ** 2).sum(-1)  # (k, 8)
    weight = np.sqrt((d**2).sum(1))  # solid pixels decide the colour, the faint rim barely
    best = int(np.argmin(weight @ resid))
    a = alpha[:, best]
    rms = float(np.sqrt((a * resid[:, best]).sum() / max(a.sum(), 1e-6)))
    y0, x0 = ys.min(), xs.min()
    cov = np.zeros((ys.max() - y0 + 1, xs.max() - x0 + 1), dtype=np.float32)
    cov[ys - y0, xs - x0] = a
    area = float(a.sum())
    col_max, row_max = cov.max(0), cov.max(1)  # a box edge contributes its partial coverage
    width, height = float(col_max.sum()), float(row_max.sum())
    rows = np.arange(cov.shape[0]) + y0 + 0.5
    cols = np.arange(cov.shape[1]) + x0 + 0.5
    cy = float(rows @ row_max / max(height, 1e-6))  # box centres from the max profiles
    cx = float(cols @ col_max / max(width, 1e-6))
    centroid_y = float(rows @ cov.sum(1) / max(area, 1e-6))
    fill = area / max(width * height, 1e-6)
    skew = (centroid_y - cy) / max(height, 1e-6)
    det = Detection(None, None, cx, cy, width, height, area, fill, skew)
    if rms > MAX_COLOUR_RMS:
        det.note = f"colour off-palette (rms {rms:.0f})"
    elif a.max() < MIN_PEAK:
        det.note = f"faint (peak coverage {a.max():.2f})"
    elif max(cov.shape) > MAX_SIDE + 2 * GROW:
        det.note = f"too large ({cov.shape[1]}x{cov.shape[0]} px)"
    elif max(width, height) > MAX_ASPECT * min(width, height):
        det.note = f"elongated ({width:.0f}x{height:.0f} px): merged or malformed"
    else:
        det.colour = _COLOURS[best]
        det.shape = _classify(fill, skew)
        if det.shape is None:
            det.note = f"shape unclear (fill {fill:.2f}, skew {skew:.2f})"
    return det


def _classify(fill: float, skew: float) -> str | None:
    """Shape from geometry: only an apex-up triangle is top-light; then fill tells the rest."""
    if skew > SKEW_TRIANGLE:
        return "triangle" if fill < 0.98 else None
    if skew < -SKEW_TRIANGLE:  # bottom-light: an upside-down triangle is not in the world
        return None
    if fill >= FILL_SQUARE:
        return "square" if fill < 1.1 else None
    return "circle" if fill >= FILL_CIRCLE else None


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB float32 (64, 64, 3) array; other sizes are box-resized to the world's 64x64."""
    if isinstance(image, np.ndarray):  # uint8, or float in [0, 255] (clipped, not wrapped)
        image = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    if image.mode != "RGB":  # transparent pixels become background, as the world draws them
        base = Image.new("RGB", image.size, BACKGROUND)
        base.paste(image, mask=image.convert("RGBA").getchannel("A"))
        image = base
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.BOX)
    return np.asarray(image, dtype=np.float32)


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """All objects in an image, specks (area < MIN_AREA) left out, sorted by area."""
    arr = to_array(image)
    dist = np.sqrt(((arr - _BG) ** 2).sum(-1))
    labels = _grow(_label(dist > SEED_DIST), dist > RIM_DIST, GROW)
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[order], np.arange(1, labels.max() + 2))
    pixels = arr.reshape(-1, 3)
    out = []
    for k in range(len(starts) - 1):
        idx = order[starts[k] : starts[k + 1]]
        if len(idx) < MIN_AREA / 2:  # cheap pre-filter before measuring
            continue
        det = _measure(pixels[idx], idx // SIZE, idx % SIZE)
        if det.area >= MIN_AREA:
            out.append(det)
    return sorted(out, key=lambda d: -d.area)


def _relation_holds(a: Detection, b: Detection, relation: str) -> bool:
    """a <relation> b: offset of centres points the named way and dominates the other axis."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # image y grows downwards
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx)}.get(
        relation, (-dy, dx)
    )
    return along > 0 and along > abs(across)


def check(prompt: Prompt, dets: list[Detection], strict: bool = False) -> tuple[bool, str]:
    """GenEval-style clauses: exact count per named shape, colours, relation; (ok, reason)."""
    objs = [d for d in dets if d.shape]
    for item in prompt.items:
        found = [d for d in objs if d.shape == item.shape]
        if len(found) != item.count:
            return False, f"expected {item.count} {item.shape}(s), found {len(found)}"
        if item.colour and found[0].colour != item.colour:
            return False, f"{item.shape} is {found[0].colour}, expected {item.colour}"
    if prompt.relation:
        a, b = (next(d for d in objs if d.shape == it.shape) for it in prompt.items)
        if not _relation_holds(a, b, prompt.relation):
            where = f"centres ({a.cx:.0f},{a.cy:.0f}) vs ({b.cx:.0f},{b.cy:.0f})"
            return False, f"{prompt.items[0].shape} not {prompt.relation} the other: {where}"
    if strict:
        named = {it.shape for it in prompt.items}
        extra = [d for d in dets if d.shape not in named]
        if extra:
            return False, f"strict: {len(extra)} object(s) not in the prompt"
    return True, "ok"


def judge(image: Image.Image | np.ndarray, prompt: str | Prompt, strict: bool = False) -> Verdict:
    """Score one image against one prompt (a str is parsed; PromptError if out of grammar)."""
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    dets = detect(image)
    ok, reason = check(p, dets, strict)
    return Verdict(ok, reason, dets)


__all__ = ["Detection", "Verdict", "PromptError", "check", "detect", "judge", "to_array"]
