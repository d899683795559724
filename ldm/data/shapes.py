"""The shapes world: a procedural 64x64 image-caption dataset with a GenEval-style caption grammar.

Every image is a flat grey background with 1-4 flat-coloured circles, squares and upright
triangles; its caption names exactly what is drawn, in one of six task families that mirror
GenEval (Ghosh et al. 2023): single object, two objects, counting, colours, position and colour
attribution. ``generate(seed, index)`` is a pure function of its arguments, so a training stream,
an exported folder and an evaluation all see the same world.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ldm.data.shapes_layout import SIZE, check_layout, place
from ldm.data.shapes_layout import cells as layout_cells
from ldm.errors import LdmError
from ldm.io import atomic_save, atomic_write_text

# --- the world (fixed: any judge can score any model of it) -------------------------------------
# SIZE, MIN_GAP and MIN_OFFSET (the placement rules) live in ldm/data/shapes_layout.py
BACKGROUND = (210, 210, 210)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (235, 205, 30),
    "green": (40, 170, 60),
    "cyan": (30, 190, 200),
    "blue": (40, 70, 210),
    "purple": (140, 60, 180),
    "black": (25, 25, 25),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
MIN_SIZE, MAX_SIZE = 12, 28  # bounding-box side in pixels
SMALL, LARGE = (12, 16), (22, 28)  # inclusive ranges named by the size words
NUMBERS = {"two": 2, "three": 3, "four": 4}
RELATIONS = ("left of", "right of", "above", "below")
# GenEval's task tags, in the order of the six caption families
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SUPERSAMPLE = 4  # render at 4x and box-downsample: anti-aliased edges, exact interior colours


class PromptError(LdmError):
    """A caption that is not one of the six forms of the shapes grammar."""


@dataclass(frozen=True)
class Item:
    """One noun phrase of a caption: ``count`` objects of ``shape`` (colour None = any)."""

    shape: str
    colour: str | None = None
    count: int = 1


@dataclass(frozen=True)
class Prompt:
    """A caption in structured form: its task family, noun phrases and optional relation."""

    task: str
    items: tuple[Item, ...]
    relation: str | None = None  # position task: items[0] <relation> items[1]

    def text(self, sizes: tuple[str | None, ...] = ()) -> str:
        """The caption; ``sizes`` optionally adds a size word ("small"/"large") per item."""
        phrases = []
        for i, item in enumerate(self.items):
            words = [sizes[i] if i < len(sizes) else None, item.colour, item.shape]
            noun = " ".join(w for w in words if w)
            if item.count > 1:
                number = next(k for k, v in NUMBERS.items() if v == item.count)
                phrases.append(f"{number} {noun}s")
            else:  # "an orange circle": the article agrees with the next word
                phrases.append(("an " if noun[0] in "aeiou" else "a ") + noun)
        if self.relation:
            return f"{phrases[0]} {self.relation} {phrases[1]}"
        return " and ".join(phrases)


@dataclass(frozen=True)
class Obj:
    """A placed object: top-left corner (x, y) and bounding-box side ``size``, in pixels."""

    shape: str
    colour: str
    x: int
    y: int
    size: int

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + self.size / 2, self.y + self.size / 2)


@dataclass(frozen=True)
class Scene:
    """What one image shows: the prompt it satisfies and the objects drawn."""

    prompt: Prompt
    objects: tuple[Obj, ...]


# --- the grammar ---------------------------------------------------------------------------------
_S = "(circle|square|triangle)"
_C = "(" + "|".join(COLOURS) + ")"
_NP = rf"an? (?:{_C} )?{_S}"
_FORMS = [
    ("np", re.compile(rf"^{_NP}$")),
    ("np_and_np", re.compile(rf"^{_NP} and {_NP}$")),
    ("counting", re.compile(rf"^(two|three|four) {_S}s$")),
    ("position", re.compile(rf"^an? {_S} (left of|right of|above|below) an? {_S}$")),
]
_VOCAB = set(SHAPES) | {s + "s" for s in SHAPES} | set(COLOURS) | set(NUMBERS)
_VOCAB |= {"a", "an", "and", "left", "right", "of", "above", "below"}


def parse_prompt(text: str) -> Prompt:
    """Parse a caption into a :class:`Prompt`; raise :class:`PromptError` saying why not."""
    t = " ".join(text.strip().lower().split())
    unknown = [w for w in t.split() if w not in _VOCAB]
    if unknown and unknown[0] in ("small", "large"):
        raise PromptError(f"size word {unknown[0]!r}: evaluation prompts name no sizes")
    if not t or unknown:
        raise PromptError(f"unknown word {unknown[0]!r}" if unknown else "empty prompt")
    for form, pattern in _FORMS:
        m = pattern.match(t)
        if m:
            return _prompt_from_match(form, m.groups())
    raise PromptError(f"{t!r} matches none of the six caption forms")


def _prompt_from_match(form: str, g: tuple) -> Prompt:
    if form == "np":
        return Prompt("colors" if g[0] else "single_object", (Item(g[1], g[0]),))
    if form == "counting":
        return Prompt("counting", (Item(g[1], None, NUMBERS[g[0]]),))
    if form == "position":
        if g[0] == g[2]:
            raise PromptError("position: the two shapes must differ")
        return Prompt("position", (Item(g[0]), Item(g[2])), relation=g[1])
    c1, s1, c2, s2 = g
    if s1 == s2:
        raise PromptError("two objects: the two shapes must differ")
    if (c1 is None) != (c2 is None):
        raise PromptError("colour attribution: give a colour for both objects or for neither")
    if c1 is not None and c1 == c2:
        raise PromptError("colour attribution: the two colours must differ")
    return Prompt("color_attr" if c1 else "two_object", (Item(s1, c1), Item(s2, c2)))


def all_prompts(task: str) -> list[Prompt]:
    """Every distinct prompt of one task family (3 to 336 of them)."""
    pairs = list(itertools.permutations(SHAPES, 2))
    if task == "single_object":
        return [Prompt(task, (Item(s),)) for s in SHAPES]
    if task == "two_object":
        return [Prompt(task, (Item(a), Item(b))) for a, b in pairs]
    if task == "counting":
        return [Prompt(task, (Item(s, None, n),)) for n in NUMBERS.values() for s in SHAPES]
    if task == "colors":
        return [Prompt(task, (Item(s, c),)) for c in COLOURS for s in SHAPES]
    if task == "position":
        return [Prompt(task, (Item(a), Item(b)), r) for r in RELATIONS for a, b in pairs]
    if task == "color_attr":
        cols = itertools.permutations(COLOURS, 2)
        return [Prompt(task, (Item(a, c), Item(b, d))) for c, d in cols for a, b in pairs]
    raise LdmError(f"unknown shapes task {task!r} (expected one of {', '.join(TASKS)})")


def eval_prompts(seed: int = 0, per_task: int = 50) -> list[str]:
    """The evaluation prompts: ``per_task`` per family, cycling a seeded shuffle of all forms."""
    out = []
    for t, task in enumerate(TASKS):
        options = all_prompts(task)
        order = np.random.default_rng([seed, t]).permutation(len(options))
        out += [options[order[i % len(options)]].text() for i in range(per_task)]
    return out


# --- sampling a scene ----------------------------------------------------------------------------
def _random_prompt(rng: np.random.Generator, task: str) -> Prompt:
    options = all_prompts(task)
    return options[int(rng.integers(len(options)))]


def _size_word(size: int) -> str | None:
    return "small" if size <= SMALL[1] else "large" if size >= LARGE[0] else None


def sample_scene(rng: np.random.Generator, prompt: Prompt, layout: str = "random") -> Scene:
    """Objects satisfying ``prompt``: sizes 12-28, unnamed colours uniform, boxes apart.

    ``layout="random"`` places boxes anywhere the rules allow (the world's own distribution, which
    evaluation uses); ``"tidy"`` puts each object in a cell given by its task and caption order
    (two objects: left, right; "above": top, bottom; four: the quadrants), a training
    distribution whose layouts the caption determines. Every tidy scene is a valid random one.
    """
    cells = layout_cells(prompt, layout)
    shapes, colours = [], []
    for item in prompt.items:
        for _ in range(item.count):
            shapes.append(item.shape)
            colours.append(item.colour or COLOURS[int(rng.integers(len(COLOURS)))])
    max_size = MAX_SIZE
    while True:  # crowded draws (four large objects) retry with smaller sizes
        sizes = [int(v) for v in rng.integers(MIN_SIZE, max_size + 1, size=len(shapes))]
        boxes = place(rng, sizes, prompt.relation, cells)
        if boxes is not None:
            break
        max_size = max(MIN_SIZE, max_size - 2)
    objs = tuple(Obj(s, c, x, y, z) for s, c, (x, y, z) in zip(shapes, colours, boxes))
    return Scene(prompt, objs)


def render(scene: Scene, palette: Mapping[str, tuple[int, int, int]] = PALETTE) -> np.ndarray:
    """Draw a scene: (64, 64, 3) uint8, 4x supersampled then box-filtered (anti-aliased).

    ``palette`` maps colour names to sRGB; a wider one renders colours outside the world, and the
    shape "diamond" (never sampled by the grammar) is drawn too: concepts the demo model has not
    seen, for the LoRA fine-tuning demonstration.
    """
    k = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * k, SIZE * k), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x0, y0, x1, y1 = o.x * k, o.y * k, (o.x + o.size) * k - 1, (o.y + o.size) * k - 1
        fill = palette[o.colour]
        if o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "diamond":  # outside the world: a square on its corner (LoRA demo)
            # |dx| + |dy| <= r at pixel centres: PIL's polygon fill is 2% heavier on one side
            half = o.size * k / 2
            c = np.arange(o.size * k) + 0.5 - half
            mask = np.abs(c)[None, :] + np.abs(c)[:, None] <= half
            img.paste(fill, (x0, y0, x1 + 1, y1 + 1), Image.fromarray(mask.astype(np.uint8) * 255))
        else:  # upright isosceles triangle filling its box: base at the bottom, apex up
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return np.asarray(img.reduce(k))


# --- the dataset ---------------------------------------------------------------------------------
def parse_mix(mix: str | Mapping[str, float] | None) -> dict[str, float]:
    """Task weights from "single_object=2,counting=1" or a mapping; None = uniform over six."""
    if mix is None or mix == "":
        return {t: 1.0 for t in TASKS}
    if isinstance(mix, str):
        pairs = {}
        for part in mix.split(","):
            name, sep, value = part.partition("=")
            try:
                pairs[name.strip()] = float(value) if sep else 1.0
            except ValueError:
                raise LdmError(f"--mix: {part!r} is not task=weight") from None
        mix = pairs
    bad = [k for k in mix if k not in TASKS]
    if bad:
        raise LdmError(f"--mix: unknown task {bad[0]!r} (expected one of {', '.join(TASKS)})")
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise LdmError("--mix: weights must be non-negative and not all zero")
    return {t: float(mix.get(t, 0.0)) for t in TASKS}


def generate(
    seed: int,
    index: int,
    mix: Mapping[str, float] | None = None,
    size_words_prob: float = 0.0,
    layout: str = "random",
) -> tuple[np.ndarray, str, Scene]:
    """Image (64, 64, 3) uint8, caption and scene for (seed, index); deterministic."""
    rng = np.random.default_rng([seed, index])
    weights = np.array(list(parse_mix(mix).values()))
    task = TASKS[int(rng.choice(len(TASKS), p=weights / weights.sum()))]
    scene = sample_scene(rng, _random_prompt(rng, task), layout)
    sizes: list[str | None] = []
    for item in scene.prompt.items:  # a size word only when it is true of every object named
        objs = [o for o in scene.objects if o.shape == item.shape]
        words = {_size_word(o.size) for o in objs}
        word = words.pop() if len(words) == 1 else None
        sizes.append(word if rng.random() < size_words_prob else None)
    return render(scene), scene.prompt.text(tuple(sizes)), scene


def render_prompt(prompt: str | Prompt, seed: int = 0, index: int = 0) -> tuple[np.ndarray, Scene]:
    """A ground-truth image for a given caption (the judge's calibration)."""
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    scene = sample_scene(np.random.default_rng([seed, index, 1]), p)
    return render(scene), scene


class ShapesDataset:
    """Endless, indexable shapes dataset: ``ds[i] -> (PIL image, caption)`` for (seed, i)."""

    def __init__(
        self,
        seed: int = 0,
        mix: str | Mapping[str, float] | None = None,  # task weights; None = uniform
        size_words_prob: float = 0.0,  # chance that a true size word is added to a phrase
        as_array: bool = False,  # items as (64, 64, 3) uint8 arrays instead of PIL images
        layout: str = "random",  # "random" (the world's) or "tidy" (see sample_scene)
    ):
        if not 0.0 <= size_words_prob <= 1.0:
            raise LdmError(f"size_words_prob must be in [0, 1], got {size_words_prob}")
        self.seed, self.mix, self.size_words_prob = seed, parse_mix(mix), size_words_prob
        self.as_array, self.layout = as_array, check_layout(layout)  # an unknown one fails now

    def sample(self, index: int) -> tuple[np.ndarray, str, Scene]:
        return generate(self.seed, index, self.mix, self.size_words_prob, self.layout)

    def __getitem__(self, index: int) -> tuple[Image.Image | np.ndarray, str]:
        if index < 0:
            raise IndexError("the shapes dataset is endless; indices are >= 0")
        image, caption, _ = self.sample(index)
        return (image if self.as_array else Image.fromarray(image)), caption

    def __iter__(self) -> Iterator[tuple[Image.Image | np.ndarray, str]]:
        return self.stream()

    def stream(
        self, start: int = 0, step: int = 1
    ) -> Iterator[tuple[Image.Image | np.ndarray, str]]:
        """Items start, start + step, ... forever (``step`` = number of workers shards it)."""
        index = start
        while True:
            yield self[index]
            index += step


def export(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    mix: str | Mapping[str, float] | None = None,
    size_words_prob: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
    layout: str = "random",
) -> Path:
    """Write an image-caption folder: ``{i:06d}.png`` + ``metadata.jsonl``; returns its path."""
    if n < 1:
        raise LdmError(f"--n must be at least 1, got {n}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LdmError(f"{out}: exists and is not a directory")
    ds = ShapesDataset(seed, mix, size_words_prob, as_array=True, layout=layout)
    lines = []
    for i in range(n):
        image, caption = ds[i]
        name = f"{i:06d}.png"
        atomic_save(out / name, lambda p, im=image: Image.fromarray(im).save(p, format="PNG"))
        lines.append(json.dumps({"file_name": name, "text": caption}))
        if progress:
            progress(i + 1, n)
    atomic_write_text(out / "metadata.jsonl", "\n".join(lines) + "\n")
    return out
