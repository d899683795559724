"""LoRA extraction (ldm.formats.lora_extract): truncated SVD of a weight change, against closed
forms (changes built from known singular values) and through ldm's and diffusers' LoRA loaders."""

from __future__ import annotations

import pytest
import torch

from ldm.formats.diffusers_folder import load_folder
from ldm.formats.lora import apply_lora, save_diffusers_lora
from ldm.formats.lora_extract import extract_lora


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q


def _change(shape: tuple, singular: list[float], gen: torch.Generator) -> torch.Tensor:
    """U diag(singular) V^T with orthonormal U, V, shaped like a (conv) weight."""
    out, inner = shape[0], int(torch.tensor(shape[1:]).prod())
    r = len(singular)
    u, v = _orthonormal(out, r, gen), _orthonormal(inner, r, gen)
    return ((u * torch.tensor(singular, dtype=torch.float64)) @ v.T).reshape(shape).float()


def _states(gen):
    base = {"a.weight": torch.randn(16, 12, generator=gen),
            "a.bias": torch.randn(16, generator=gen),
            "b.conv.weight": torch.randn(8, 6, 3, 3, generator=gen),
            "b.norm.weight": torch.ones(6),
            "c.weight": torch.randn(5, 5, generator=gen)}  # fmt: skip
    change = {"a.weight": _change((16, 12), [3.0, 2.0, 1.0], gen),
              "b.conv.weight": _change((8, 6, 3, 3), [2.0, 1.0], gen)}  # fmt: skip
    tuned = {k: v + change[k] if k in change else v.clone() for k, v in base.items()}
    tuned["a.bias"] += 0.5  # 16 * 0.25 = 4 of squared change a LoRA cannot hold
    tuned["b.norm.weight"] += 0.5  # 6 * 0.25 = 1.5
    return base, tuned, change


def test_full_rank_pairs_rebuild_the_change_and_the_report_adds_up():
    base, tuned, change = _states(torch.Generator().manual_seed(0))
    pairs, report = extract_lora(base, tuned, rank=3)
    assert sorted(p.name for p in pairs) == ["a", "b.conv"]  # c unchanged: no pair
    for p in pairs:
        assert p.alpha == p.rank and p.down.dim() == change[f"{p.name}.weight"].dim()
        rebuilt = (p.up.flatten(1) @ p.down.flatten(1)).reshape(change[f"{p.name}.weight"].shape)
        torch.testing.assert_close(rebuilt, change[f"{p.name}.weight"], rtol=0, atol=1e-5)
    total = 9 + 4 + 1 + 4 + 1 + 4 + 1.5  # singular values squared, then bias and norm
    assert report.layers == 2
    assert report.kept == pytest.approx(19 / total, abs=1e-6)
    assert report.truncated == pytest.approx(0, abs=1e-9)
    assert report.not_lora == pytest.approx(5.5 / total, abs=1e-6)


def test_rank_one_keeps_the_largest_singular_value_only():
    """Eckart-Young: the best rank-1 approximation keeps s1 u1 v1^T; the rest is cut."""
    base, tuned, _ = _states(torch.Generator().manual_seed(1))
    pairs, report = extract_lora(base, tuned, rank=1)
    assert [p.rank for p in pairs] == [1, 1]
    total = 24.5
    assert report.kept == pytest.approx((9 + 4) / total, abs=1e-6)
    assert report.truncated == pytest.approx((4 + 1 + 1) / total, abs=1e-6)
    up = pairs[0].up  # a's: |s1 u1| has norm 3
    assert float(up.norm() * pairs[0].down.norm()) == pytest.approx(3.0, abs=1e-5)


def test_refuses_a_bad_rank_and_mismatched_state_dicts():
    base, tuned, _ = _states(torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        extract_lora(base, tuned, rank=0)
    with pytest.raises(ValueError, match="different keys"):
        extract_lora(base, {k: v for k, v in tuned.items() if k != "c.weight"}, rank=2)


def test_extracted_file_moves_the_base_onto_the_tuned_weights(tiny_sd1, tmp_path):
    """A tiny U-Net's linears and 3x3 / 1x1 convolutions moved by low-rank changes: the written
    file, applied by ldm's loader and by diffusers' load_lora_weights, gives the tuned weights."""
    import diffusers

    gen = torch.Generator().manual_seed(3)
    base = {k: v.clone() for k, v in load_folder(tiny_sd1).unet.state_dict().items()}
    tuned = dict(base)
    names = [k for k, v in base.items() if k.endswith(".weight") and v.dim() in (2, 4)]
    moved = [n for n in names if any(s in n for s in ("to_q", "conv1", "proj_in", "time_emb"))]
    assert any(base[n].dim() == 4 and base[n].shape[-1] == 3 for n in moved)
    for n in moved:
        tuned[n] = base[n] + 0.1 * _change(tuple(base[n].shape), [1.0, 0.5], gen)
    pairs, report = extract_lora(base, tuned, rank=2)
    assert report.layers == len(moved) and report.kept == pytest.approx(1.0, abs=1e-6)
    path = save_diffusers_lora(pairs, tmp_path / "pytorch_lora_weights.safetensors")

    parts = load_folder(tiny_sd1)
    assert apply_lora(parts, path).warning() is None
    ours = parts.unet.state_dict()
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd1)
    theirs.load_lora_weights(str(path))
    theirs.fuse_lora()
    fused = {k.replace(".base_layer", ""): v for k, v in theirs.unet.state_dict().items()
             if "lora_" not in k}  # fmt: skip
    for n in names:
        torch.testing.assert_close(ours[n], tuned[n], rtol=0, atol=1e-5)
        torch.testing.assert_close(fused[n], tuned[n], rtol=0, atol=1e-5)
