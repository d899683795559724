"""Aspect-ratio buckets against kohya's algorithm, with expected values worked out by hand."""

import math
import random

import pytest

from ldm.data.buckets import BucketManager, make_bucket_resolutions
from ldm.errors import ConfigError


def test_resolutions_512_by_hand():
    # width w from 256 to 1024 in 64s; height = floor(512² / w / 64) * 64, capped at 1024:
    # 256->1024, 320->768, 384->640, 448->576, 512->512, 576->448, 640->384, 704->320,
    # 768->320, 832..1024->256; each also transposed; plus the 512 square.
    half = [(256, 1024), (256, 960), (256, 896), (256, 832), (320, 768), (320, 704),
            (384, 640), (448, 576)]  # fmt: skip
    expected = sorted(half + [(h, w) for w, h in half] + [(512, 512)])
    assert make_bucket_resolutions(512, 256, 1024, 64) == expected
    assert len(expected) == 17


@pytest.mark.parametrize("reso", [256, 512, 768, 1024, (512, 768)])
def test_resolutions_area_steps_and_bounds(reso):
    w0, h0 = (reso, reso) if isinstance(reso, int) else reso
    resos = make_bucket_resolutions(reso, 256, 2048, 64)
    assert resos == sorted(set(resos))
    side = int(math.sqrt(w0 * h0)) // 64 * 64
    assert (side, side) in resos
    for w, h in resos:
        assert w * h <= w0 * h0
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= min(w, h) and max(w, h) <= 2048
        # maximal: one more step on the derived side would break the area or the max side
        grow_h = w * (h + 64) > w0 * h0 or h + 64 > 2048
        grow_w = (w + 64) * h > w0 * h0 or w + 64 > 2048
        assert grow_h or grow_w or (w, h) == (side, side)


def test_select_by_hand():
    bm = BucketManager(512, 256, 1024, 64)
    # 1000x500 (aspect 2.0): 704x320 has aspect 2.2 (error 0.2), 640x384 has 1.667 (0.333).
    # The bucket is relatively wider, so the height is matched: scale 704/1000 -> 704x352.
    p = bm.select(1000, 500)
    assert p.bucket == (704, 320) and p.resized == (704, 352)
    p = bm.select(500, 1000)
    assert p.bucket == (320, 704) and p.resized == (352, 704)
    assert bm.select(600, 600).bucket == (512, 512)
    assert bm.select(600, 600).resized == (512, 512)
    # an image already at a bucket size is kept as is
    p = bm.select(448, 576)
    assert p.bucket == (448, 576) and p.resized == (448, 576)


def test_select_closest_aspect_and_covers():
    bm = BucketManager(512, 256, 1024, 64)
    rng = random.Random(0)
    for _ in range(300):
        w, h = rng.randint(100, 3000), rng.randint(100, 3000)
        p = bm.select(w, h)
        best = min(abs(bw / bh - w / h) for bw, bh in bm.resolutions)
        assert abs(p.bucket[0] / p.bucket[1] - w / h) == best
        # the resized image covers the bucket and touches it on one side
        assert p.resized[0] >= p.bucket[0] and p.resized[1] >= p.bucket[1]
        assert p.resized[0] == p.bucket[0] or p.resized[1] == p.bucket[1]


def test_no_upscale_by_hand():
    bm = BucketManager(512, 256, 1024, 64, no_upscale=True)
    # small image: own size, sides rounded down to 64 -> crop 256x192 out of the 300x200 image
    p = bm.select(300, 200)
    assert p.bucket == (256, 192) and p.resized == (300, 200)
    # 2000x1000 is over the area: exact shrink is 724.1x362.0. Rounding the width gives
    # 704 x round(352)->320 (aspect 2.2); rounding the height gives 320 -> width 640 (aspect
    # 2.0, exact), which wins: resized 640x320, bucket 640x320.
    p = bm.select(2000, 1000)
    assert p.bucket == (640, 320) and p.resized == (640, 320)


def test_no_upscale_never_upscales():
    bm = BucketManager(512, 256, 1024, 64, no_upscale=True)
    rng = random.Random(1)
    for _ in range(300):
        w, h = rng.randint(64, 3000), rng.randint(64, 3000)
        p = bm.select(w, h)
        assert p.bucket[0] <= p.resized[0] <= w and p.bucket[1] <= p.resized[1] <= h
        assert p.bucket[0] % 64 == 0 and p.bucket[1] % 64 == 0
        assert p.bucket[0] * p.bucket[1] <= 512 * 512


def test_bad_bucket_config():
    with pytest.raises(ConfigError):
        BucketManager(512, 256, 384, 64)
    with pytest.raises(ConfigError):
        BucketManager(512, 512, 256, 64)
