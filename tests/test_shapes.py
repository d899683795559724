"""The shapes world: exact colours, geometry, layout rules, caption grammar, export, prompt file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data import shapes as S
from ldm.data import shapes_layout
from ldm.errors import LdmError

ROOT = Path(__file__).resolve().parents[1]


def _scene(*objs: S.Obj) -> S.Scene:
    return S.Scene(S.Prompt("single_object", (S.Item(objs[0].shape),)), objs)


def test_colours_are_exact_srgb_and_background_flat():
    for colour, rgb in S.PALETTE.items():
        img = S.render(_scene(S.Obj("square", colour, 10, 20, 16)))
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert (img[20:36, 10:26] == rgb).all()  # the whole square, edges included (on grid)
        assert (img[:20] == S.BACKGROUND).all() and (img[36:] == S.BACKGROUND).all()
        assert (img[:, :10] == S.BACKGROUND).all() and (img[:, 26:] == S.BACKGROUND).all()


@pytest.mark.parametrize("shape", [*S.SHAPES, "diamond"])
def test_rendered_shape_fills_its_box(shape):
    """Ink only inside the box, touching all four sides; coverage area as the geometry says."""
    x, y, s = 9, 14, 24
    img = S.render(_scene(S.Obj(shape, "black", x, y, s))).astype(float)
    cover = (210 - img[..., 0]) / (210 - 25)  # black on grey: coverage per pixel, exact
    ys, xs = np.nonzero(cover > 0.01)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (x, x + s - 1, y, y + s - 1)
    expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5, "diamond": 0.5}[shape]
    assert cover.sum() / s**2 == pytest.approx(expected, abs=0.03)
    top, bottom = cover[y : y + s // 2].sum(), cover[y + s // 2 : y + s].sum()
    assert (top / bottom < 0.4) if shape == "triangle" else (top == pytest.approx(bottom, 0.02))


def test_generate_is_deterministic_per_seed_and_index():
    a, b = S.generate(3, 7), S.generate(3, 7)
    assert (a[0] == b[0]).all() and a[1] == b[1] and a[2] == b[2]
    assert S.generate(3, 8)[1:] != a[1:] or not (S.generate(3, 8)[0] == a[0]).all()
    assert S.generate(4, 7)[2] != a[2]


def _apart(a: S.Obj, b: S.Obj) -> bool:
    gap_x = max(b.x - (a.x + a.size), a.x - (b.x + b.size))
    gap_y = max(b.y - (a.y + a.size), a.y - (b.y + b.size))
    return max(gap_x, gap_y) >= shapes_layout.MIN_GAP


@pytest.mark.parametrize("layout", shapes_layout.LAYOUTS)
def test_world_invariants_over_many_scenes(layout):
    """Both layouts draw valid scenes of the world: a tidy scene is also a possible random one."""
    tasks = set()
    for i in range(400):
        _, caption, scene = S.generate(0, i, size_words_prob=0.5, layout=layout)
        p, objs = scene.prompt, scene.objects
        tasks.add(p.task)
        bare = " ".join(w for w in caption.split() if w not in ("small", "large"))
        assert S.parse_prompt(bare) == p  # the caption says exactly what the scene is
        assert len(objs) == sum(it.count for it in p.items)
        for o in objs:
            assert S.MIN_SIZE <= o.size <= S.MAX_SIZE
            assert 0 <= o.x and o.x + o.size <= 64 and 0 <= o.y and o.y + o.size <= 64
        assert all(_apart(a, b) for j, a in enumerate(objs) for b in objs[j + 1 :])
        for it in p.items:  # named shapes and colours are the drawn ones
            drawn = [o for o in objs if o.shape == it.shape]
            assert len(drawn) == it.count and all(it.colour in (None, o.colour) for o in drawn)
        if p.relation:
            (ax, ay), (bx, by) = objs[0].center, objs[1].center
            along, across = {
                "left of": (bx - ax, by - ay), "right of": (ax - bx, by - ay),
                "above": (by - ay, bx - ax), "below": (ay - by, bx - ax),
            }[p.relation]  # fmt: skip
            assert along >= 16 and abs(across) < 16
        for word, (lo, hi) in (("small", S.SMALL), ("large", S.LARGE)):
            for phrase in re.split(" and | left of | right of | above | below ", caption):
                if word in phrase.split():  # a size word is true of what it names
                    shape = next(s for s in S.SHAPES if s in phrase)
                    assert all(lo <= o.size <= hi for o in objs if o.shape == shape)
    assert tasks == set(S.TASKS)


def test_tidy_layout_puts_objects_in_caption_order_cells():
    half = S.SIZE / 2
    seen = set()
    for i in range(300):
        _, _, scene = S.generate(5, i, layout="tidy")
        p, centres = scene.prompt, [o.center for o in scene.objects]
        n = len(centres)
        seen.add(p.relation or n)
        if p.relation in ("left of", "right of") or (not p.relation and n == 2):
            (ax, _), (bx, _) = centres  # caption order is reading order: first left
            assert (ax < half < bx) if p.relation != "right of" else (bx < half < ax)
        elif p.relation:
            (_, ay), (_, by) = centres
            assert (ay < half < by) if p.relation == "above" else (by < half < ay)
        elif n == 4:  # one per quadrant, in reading order
            assert [(x > half, y > half) for x, y in centres] == [(0, 0), (1, 0), (0, 1), (1, 1)]
        elif n == 3:  # two on top, one below in the middle
            assert centres[0][1] < half and centres[1][1] < half < centres[2][1]
            assert centres[0][0] < half < centres[1][0]
    assert seen == {1, 2, 3, 4, *S.RELATIONS}
    # single objects are placed anywhere, as in the world's own layout
    xs = {S.generate(5, i, mix="single_object=1", layout="tidy")[2].objects[0].x for i in range(40)}
    assert len(xs) > 15
    with pytest.raises(LdmError, match="unknown shapes layout 'grid'"):
        S.ShapesDataset(layout="grid")


def test_mix_weights_and_errors():
    assert {S.generate(1, i, mix="counting=1")[2].prompt.task for i in range(30)} == {"counting"}
    assert S.parse_mix(None) == {t: 1.0 for t in S.TASKS}
    assert S.parse_mix({"colors": 2})["colors"] == 2.0 and S.parse_mix("colors=2")["position"] == 0
    for bad in ("nope=1", "colors=x", "colors=0", "colors=-1"):
        with pytest.raises(LdmError, match="--mix"):
            S.parse_mix(bad)


def test_grammar_round_trips_every_prompt():
    for task in S.TASKS:
        for p in S.all_prompts(task):
            assert S.parse_prompt(p.text()) == p and p.task == task
    assert S.parse_prompt("  An ORANGE  circle ").text() == "an orange circle"
    assert S.parse_prompt("a orange circle").items[0].colour == "orange"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("a hexagon", "unknown word 'hexagon'"),
        ("a small circle", "size word"),
        ("a circle and a circle", "must differ"),
        ("a red circle and a square", "both objects"),
        ("a red circle and a red square", "colours must differ"),
        ("a circle above a circle", "must differ"),
        ("five circles", "unknown word"),
        ("circle a", "none of the six"),
        ("", "empty"),
    ],
)
def test_grammar_rejects_with_reason(text, reason):
    with pytest.raises(S.PromptError, match=reason):
        S.parse_prompt(text)


def test_shipped_prompt_file_is_the_generators_output():
    from ldm.cli.shapes import prompts_text

    shipped = (ROOT / "configs" / "eval" / "shapes-prompts.txt").read_text()
    assert shipped == prompts_text(0, 50)
    prompts = S.eval_prompts()
    assert len(prompts) == 300
    tasks = [S.parse_prompt(p).task for p in prompts]
    assert all(tasks.count(t) == 50 for t in S.TASKS)
    assert sorted(set(prompts[:50])) == ["a circle", "a square", "a triangle"]


def test_dataset_items_and_stream():
    ds = S.ShapesDataset(seed=2, size_words_prob=0.3)
    img, caption = ds[5]
    assert isinstance(img, Image.Image) and img.size == (64, 64) and img.mode == "RGB"
    stream = ds.stream(start=4, step=1)
    next(stream)
    img2, caption2 = next(stream)
    assert caption2 == caption and np.array_equal(np.asarray(img2), np.asarray(img))
    arr, _ = S.ShapesDataset(seed=2, size_words_prob=0.3, as_array=True)[5]
    assert np.array_equal(arr, np.asarray(img))
    with pytest.raises(LdmError):
        S.ShapesDataset(size_words_prob=2.0)


def test_export_writes_an_imagefolder(tmp_path):
    out = S.export(tmp_path / "ds", 6, seed=1, mix="colors=1,position=1")
    rows = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"{i:06d}.png" for i in range(6)]
    for i, row in enumerate(rows):
        image, caption, _ = S.generate(1, i, S.parse_mix("colors=1,position=1"))
        assert row["text"] == caption
        assert np.array_equal(np.asarray(Image.open(out / row["file_name"])), image)
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_cli_export_and_prompts(tmp_path, capsys):
    from ldm.cli import main

    assert main(["shapes", "export", str(tmp_path / "d"), "--n", "3", "--no-progress"]) == 0
    assert len((tmp_path / "d" / "metadata.jsonl").read_text().splitlines()) == 3
    assert main(["shapes", "export", str(tmp_path / "t"), "--n", "2", "--layout", "tidy"]) == 0
    tidy = [S.generate(0, i, layout="tidy")[0] for i in range(2)]
    assert all(np.array_equal(np.asarray(Image.open(tmp_path / "t" / f"{i:06d}.png")), tidy[i])
               for i in range(2))  # fmt: skip
    assert main(["shapes", "export", str(tmp_path / "e"), "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    assert main(["shapes", "prompts", "--per-task", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 12


def test_generator_loop_yields_valid_distinct_items():
    """The loop scripts/bench_shapes.py times (its rate lives there): every item well formed."""
    items = [S.generate(0, i) for i in range(300)]
    assert all(im.shape == (64, 64, 3) and im.dtype == np.uint8 for im, *_ in items)
    assert all(isinstance(caption, str) and caption for _, caption, _ in items)
    assert len({im.tobytes() for im, *_ in items}) == 300
