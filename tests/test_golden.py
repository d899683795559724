"""Golden numbers of the eps demo model: an unintended change to its output fails.

The model is ``shapes-demo-eps``, the default model when the numbers were recorded (the flow-
trained ``shapes-demo`` replaced it as the default; tests/test_interop.py checks that one
against a sampling loop over diffusers' own classes).

A fixed prompt, seeds and sampler regenerate two images; their per-channel mean and std and an
8x8 mean-pooled thumbnail must match tests/golden/demo_model.json, recorded once from the code
before issue 18. The tolerances sit well above rounding-level noise and well below what a one-step
change makes (the file's "tolerance_evidence" has the measured figures). Record again with
``python tests/test_golden.py --record`` only when a change to the output is intended.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "golden" / "demo_model.json"
MODEL = "shapes-demo-eps"  # the bundled model the numbers were recorded with
THUMB = 8  # thumbnail side: each cell averages (64/8)^2 = 64 pixels of the 64x64 image
STATS = ("mean", "std", "thumb")


def image_stats(image) -> dict:
    """Per-channel mean and std over pixels (0..255) and an 8x8 mean-pooled thumbnail."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w, c = a.shape
    thumb = a.reshape(THUMB, h // THUMB, THUMB, w // THUMB, c).mean(axis=(1, 3))  # (8, 8, c)
    return {
        "size": [w, h],
        "mean": a.mean(axis=(0, 1)).round(4).tolist(),
        "std": a.std(axis=(0, 1)).round(4).tolist(),
        "thumb": thumb.round(3).tolist(),
    }


def generate(pipe, settings: dict, **changes) -> list[dict]:
    """Run the demo model with the recorded settings (``changes`` override some) -> stats."""
    s = {**settings, **changes}
    out = pipe(
        [s["prompt"]] * len(s["seeds"]),
        s["seeds"],
        steps=s["steps"],
        sampler=s["sampler"],
        guidance_scale=s["guidance_scale"],
    )
    return [image_stats(g.image) for g in out]


def max_differences(got: list[dict], want: list[dict]) -> dict:
    """Largest absolute difference of each statistic over all images."""
    return {
        k: max(float(np.abs(np.subtract(g[k], w[k])).max()) for g, w in zip(got, want))
        for k in STATS
    }


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def demo():
    from ldm.pipeline import load_pipeline

    return load_pipeline(MODEL)


@pytest.fixture(scope="module")
def current(demo, golden) -> list[dict]:
    return generate(demo, golden["settings"])


def test_demo_model_matches_golden(golden, current):
    assert [g["size"] for g in current] == [w["size"] for w in golden["images"]]
    diffs = max_differences(current, golden["images"])
    too_far = {k: v for k, v in diffs.items() if v > golden["tolerance"][k]}
    assert not too_far, f"demo output moved: {diffs} (tolerance {golden['tolerance']})"


def test_tolerance_catches_one_step_less(demo, golden, current):
    """The test can fail: 19 steps instead of 20 is outside the tolerance."""
    changed = generate(demo, golden["settings"], steps=golden["settings"]["steps"] - 1)
    diffs = max_differences(changed, current)
    assert any(diffs[k] > golden["tolerance"][k] for k in STATS), diffs


def record() -> None:
    """Write the golden file from whatever ldm is on sys.path (keeps settings and tolerances)."""
    import ldm
    from ldm.pipeline import load_pipeline

    data = json.loads(GOLDEN.read_text())
    data["images"] = generate(load_pipeline(MODEL), data["settings"])
    data["recorded_with"] = str(Path(ldm.__file__).parent)
    GOLDEN.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {GOLDEN} from {data['recorded_with']}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record")
    record()
