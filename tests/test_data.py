"""Data sources, safe decoding, transforms, the resumable loader and the caches (tiny, CPU)."""

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.buckets import BucketManager
from ldm.data.cache import LatentCache, TextEmbeddingCache, precompute_latents
from ldm.data.folders import expand_braces, open_source
from ldm.data.images import (
    CropParams,
    SkipImage,
    apply_crop,
    crop_params,
    decode_image,
    probe_size,
    to_tensor,
)
from ldm.data.loader import BatchIterator
from ldm.errors import LdmError


def png(w: int, h: int, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    img = Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(w: int, h: int) -> bytes:
    """A valid 1x1 PNG whose header claims w x h: only a header check can catch it cheaply."""
    data = bytearray(png(1, 1))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length + type
    data[ihdr : ihdr + 8] = struct.pack(">II", w, h)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def make_sidecar_folder(root, n=6, sizes=((64, 64), (128, 48))):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        (root / f"img{i}.png").write_bytes(png(w, h, seed=i))
        (root / f"img{i}.txt").write_text(f"caption {i}\n")
    return root


def test_metadata_jsonl(tmp_path):
    (tmp_path / "a.png").write_bytes(png(32, 32, 1))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jpg").write_bytes(png(32, 16, 2))
    rows = [{"file_name": "a.png", "text": "a red cat"}, {"file_name": "sub/b.jpg", "caption": "b"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    src = open_source(tmp_path)
    assert [s.key for s in src] == ["a.png", "sub/b.jpg"]
    assert [s.caption for s in src] == ["a red cat", "b"]
    assert probe_size(src[1].load()) == (32, 16)
    rows.append({"file_name": "gone.png", "text": "listed but missing"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    it = BatchIterator(open_source(tmp_path), batch_size=1, resolution=16)
    assert it.skipped == {"missing image": 1} and len(it.entries) == 2
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\nnot json\n')
    with pytest.raises(LdmError, match="metadata.jsonl:2"):
        open_source(tmp_path)


def test_sidecars(tmp_path):
    (tmp_path / "a.png").write_bytes(png(16, 16, 1))
    (tmp_path / "a.txt").write_text("  first  \n")
    (tmp_path / "b.webp").write_bytes(png(16, 16, 2))  # content sniffed, not the extension
    (tmp_path / "b.caption").write_text("second")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "c.jpeg").write_bytes(png(16, 16, 3))
    (tmp_path / "deep" / "c.txt").write_text("third")
    (tmp_path / "d.png").write_bytes(png(16, 16, 4))  # no caption: kept, skipped by the loader
    src = open_source(tmp_path)
    got = {s.key: s.caption for s in src}
    assert got == {"a.png": "first", "b.webp": "second", "deep/c.jpeg": "third", "d.png": None}


@pytest.mark.parametrize("header", ["image,caption", "file_name,text"])
def test_csv(tmp_path, header):
    (tmp_path / "x.png").write_bytes(png(16, 16, 1))
    (tmp_path / "y.png").write_bytes(png(16, 16, 2))
    (tmp_path / "data.csv").write_text(f'{header}\nx.png,"a, quoted caption"\ny.png,plain\n')
    src = open_source(tmp_path / "data.csv")
    assert [(s.key, s.caption) for s in src] == [("x.png", "a, quoted caption"), ("y.png", "plain")]
    assert src[0].load() == (tmp_path / "x.png").read_bytes()
    (tmp_path / "bad.csv").write_text("picture,words\nx.png,a\n")
    with pytest.raises(LdmError, match="bad.csv"):
        open_source(tmp_path / "bad.csv")


def write_shard(path, items):
    with tarfile.open(path, "w") as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    images = {f"{i:04d}": png(24, 16, seed=i) for i in range(6)}
    for shard in range(3):
        items = []
        for k in list(images)[shard * 2 : shard * 2 + 2]:
            items += [(f"{k}.png", images[k]), (f"{k}.txt", f"cap {k}".encode())]
        write_shard(tmp_path / f"shards-{shard:03d}.tar", items)
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    by_pattern = open_source(str(tmp_path / "shards-{000..002}.tar"))
    by_folder = open_source(tmp_path)
    single = open_source(tmp_path / "shards-001.tar")
    assert [s.key for s in by_pattern] == [s.key for s in by_folder]
    assert len(by_pattern) == 6 and len(single) == 2
    for s in by_pattern:
        k = s.key.split("/")[-1]
        assert s.caption == f"cap {k}" and s.load() == images[k]  # read in place by offset
    with pytest.raises(LdmError, match="not found"):
        open_source(str(tmp_path / "shards-{000..003}.tar"))


def test_shapes_source():
    pytest.importorskip("ldm.data.shapes", reason="ldm/data/shapes.py not written yet")
    src = open_source("shapes:3")
    assert src.endless
    it = BatchIterator(src, batch_size=4, seed=0, resolution=64)
    batch = next(it)
    assert batch["pixels"].shape == (4, 3, 64, 64) and batch["keys"] == ["0", "1", "2", "3"]
    assert all(isinstance(c, str) and c for c in batch["captions"])
    it2 = BatchIterator(src, batch_size=4, seed=0, resolution=64)
    it2.load_state_dict(it.state_dict())
    assert next(it)["keys"] == next(it2)["keys"] == ["4", "5", "6", "7"]


def test_safe_decoding_reasons():
    good = png(40, 30)
    assert decode_image(good).size == (40, 30)
    cases = {
        b"": "zero-byte file",
        good[: len(good) // 2]: "corrupt or truncated image",
        b"\x89PNG\r\n\x1a\n" + b"garbage" * 20: "unreadable image",
        bomb_png(100_000, 100_000): "oversized image",  # PIL's DecompressionBombError
        bomb_png(10_000, 10_000): "oversized image",  # PIL's DecompressionBombWarning
    }
    for data, kind in cases.items():
        with pytest.raises(SkipImage) as e:
            decode_image(data)
        assert e.value.kind == kind
    with pytest.raises(SkipImage, match="oversized image: 40x30 > max_pixels 1000"):
        probe_size(good, max_pixels=1000)
    assert probe_size(bomb_png(5000, 5000), max_pixels=10**8) == (5000, 5000)  # header only


def test_bad_samples_skipped_and_listed(tmp_path):
    data = make_sidecar_folder(tmp_path / "data", n=4)
    (data / "zero.png").write_bytes(b"")
    (data / "zero.txt").write_text("zero")
    (data / "trunc.png").write_bytes(png(64, 64, 9)[:300])  # header fine, pixels cut
    (data / "trunc.txt").write_text("truncated")
    (data / "bomb.png").write_bytes(bomb_png(20_000, 20_000))
    (data / "bomb.txt").write_text("bomb")
    (data / "nocap.png").write_bytes(png(64, 64, 10))
    (data / "empty.png").write_bytes(png(64, 64, 11))
    (data / "empty.txt").write_text("   \n")
    log = tmp_path / "run" / "skipped.jsonl"
    it = BatchIterator(open_source(data), 2, seed=0, resolution=32, max_pixels=10**6, skip_log=log)
    keys = [k for _ in range(it.batches_per_epoch) for k in next(it)["keys"]]
    assert sorted(set(keys)) == ["img0.png", "img1.png", "img2.png", "img3.png"]
    rows = {r["key"]: r for r in map(json.loads, log.read_text().splitlines())}
    reasons = {k: r["reason"].split(":")[0] for k, r in rows.items()}
    assert reasons == {
        "zero.png": "zero-byte file",
        "trunc.png": "corrupt or truncated image",
        "bomb.png": "oversized image",
        "nocap.png": "missing caption",
        "empty.png": "empty caption",
    }
    assert rows["zero.png"]["path"].endswith("zero.png")
    assert it.skipped == {k: 1 for k in reasons.values()}


def test_transforms():
    rgba = Image.new("RGBA", (8, 4), (255, 0, 0, 0))  # fully transparent -> white
    t = to_tensor(decode_image(rgba))
    assert t.shape == (3, 4, 8) and torch.all(t == 1.0)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 255] * 256)
    assert torch.all(to_tensor(decode_image(pal))[2] == 1.0)
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    p = crop_params((30, 20), (16, 16), resized=(30, 20))  # no resize: an exact crop
    assert (p.left, p.top) == (7, 2)
    out = to_tensor(apply_crop(img, p))
    expect = torch.from_numpy(arr[2:18, 7:23]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(out, expect) and out.min() >= -1 and out.max() <= 1
    flipped = to_tensor(apply_crop(img, CropParams((16, 16), (30, 20), 7, 2, True, (30, 20))))
    assert torch.equal(flipped, expect.flip(-1))
    # resize the shorter side to 16, then centre crop: 30x20 -> 24x16 -> 16x16 at left 4
    p = crop_params((30, 20), (16, 16))
    assert p.resized == (24, 16) and (p.left, p.top) == (4, 0)
    assert to_tensor(apply_crop(img, p)).shape == (3, 16, 16)
    rng = np.random.default_rng(0)
    lefts = {crop_params((30, 20), (16, 16), (30, 20), True, False, rng).left for _ in range(50)}
    assert lefts == set(range(15))


def run_batches(it, n):
    return [next(it) for _ in range(n)]


def same_batches(a, b):
    return all(
        x["keys"] == y["keys"] and torch.equal(x["pixels"], y["pixels"]) for x, y in zip(a, b)
    )


def make_loader(data, **kw):
    buckets = BucketManager(64, 32, 128, 32)
    kw = {"batch_size": 2, "seed": 7, "buckets": buckets, "random_crop": True, "flip": True} | kw
    return BatchIterator(open_source(data), **kw)


def test_epochs_buckets_and_determinism(tmp_path):
    data = make_sidecar_folder(tmp_path, n=7)
    it = make_loader(data)
    # buckets for 64 (32..128 by 32): 32x96, 32x128, 64x64, 96x32, 128x32; 128x48 (aspect
    # 2.67) goes to 96x32 (aspect 3), resized to cover it: 96x36
    assert it.bucket_counts == {(64, 64): 4, (96, 32): 3}
    assert it.entries[1].placement.resized == (96, 36)
    n = it.batches_per_epoch  # buckets of 4 and 3 -> 2 + 2 batches (the last one wrapped)
    assert n == 4
    epoch0, epoch1 = run_batches(it, n), run_batches(it, n)
    for epoch in (epoch0, epoch1):
        assert {k for b in epoch for k in b["keys"]} == {f"img{i}.png" for i in range(7)}
        for b in epoch:  # one bucket per batch
            assert len({c.size for c in b["crops"]}) == 1
            assert b["pixels"].shape[-2:] == tuple(reversed(b["crops"][0].size))
    assert [b["keys"] for b in epoch0] != [b["keys"] for b in epoch1]
    again = make_loader(data)
    assert same_batches(epoch0 + epoch1, run_batches(again, 2 * n))


def test_resume_gives_identical_batches(tmp_path):
    data = make_sidecar_folder(tmp_path, n=7)
    reference = run_batches(make_loader(data), 9)  # crosses two epoch boundaries
    first = make_loader(data, prefetch=2)
    head = run_batches(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    first.close()
    resumed = make_loader(data, prefetch=1)
    resumed.load_state_dict(state)
    assert same_batches(reference, head + run_batches(resumed, 6))
    other = make_loader(data, seed=8)
    with pytest.raises(LdmError, match="seed"):
        other.load_state_dict(state)


def test_shards_are_disjoint_slices(tmp_path):
    data = make_sidecar_folder(tmp_path, n=7)
    full = run_batches(make_loader(data, batch_size=4), 6)
    parts = [run_batches(make_loader(data, batch_size=4, num_shards=2, shard_index=r), 6)
             for r in range(2)]  # fmt: skip
    for b, p0, p1 in zip(full, *parts):
        assert len(p0["keys"]) == len(p1["keys"]) == 2
        assert p0["keys"] + p1["keys"] == b["keys"]
        assert torch.equal(torch.cat([p0["pixels"], p1["pixels"]]), b["pixels"])


def test_latent_and_text_cache(tmp_path):
    cache = LatentCache(tmp_path / "lat", vae_hash="vae1")
    p = CropParams((64, 64), (64, 64), 0, 0, False, (64, 64))
    mean, std = torch.randn(4, 8, 8), torch.rand(4, 8, 8)
    assert cache.get("k", p) is None
    cache.put("k", p, mean, std)
    got = cache.get("k", p)
    assert torch.allclose(got[0], mean, atol=1e-2) and torch.allclose(got[1], std, atol=1e-3)
    assert cache.get("k", CropParams((64, 64), (64, 64), 0, 0, True, (64, 64))) is None  # flip
    assert LatentCache(tmp_path / "lat", vae_hash="vae2").get("k", p) is None  # new VAE: stale
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    z = LatentCache.sample(got[0], got[1], g1)
    assert torch.equal(z, got[0] + got[1] * torch.randn(got[0].shape, generator=g2))
    text = TextEmbeddingCache(tmp_path / "txt", encoder_hash="te1")
    text.put("a cat", torch.ones(77, 16))
    assert torch.equal(text.get("a cat")["context"], torch.ones(77, 16))
    assert text.get("a dog") is None
    assert TextEmbeddingCache(tmp_path / "txt", encoder_hash="te2").get("a cat") is None


def test_loader_uses_latent_cache(tmp_path):
    data = make_sidecar_folder(tmp_path / "d", n=4, sizes=((64, 64),))
    cache = LatentCache(tmp_path / "lat", vae_hash="pool")

    def encode_dist(pixels):  # a stand-in VAE: 8x average pooling
        mean = torch.nn.functional.avg_pool2d(pixels, 8)
        return mean, torch.full_like(mean, 0.5)

    plain = make_loader(data, flip=True, random_crop=False)
    written = precompute_latents(run_batches(plain, plain.batches_per_epoch), cache, encode_dist)
    assert written == 8  # 4 images x 2 flip states
    cached = make_loader(data, flip=True, random_crop=False, latent_cache=cache)
    reference = make_loader(data, flip=True, random_crop=False)
    for _ in range(4):  # two epochs: every flip state was cached
        b, r = next(cached), next(reference)
        assert "pixels" not in b and b["keys"] == r["keys"]
        assert torch.allclose(b["latent_mean"], encode_dist(r["pixels"])[0], atol=1e-2)
    fresh = make_loader(data, latent_cache=LatentCache(tmp_path / "lat", vae_hash="other"))
    assert "pixels" in next(fresh)  # a miss falls back to pixels
