"""SD3 LoRA files in diffusers/PEFT names (``transformer.``): applied, converted, reported.

The reference is diffusers' own loader: the file made by peft and
``StableDiffusion3Pipeline.save_lora_weights`` (sd3_lora_helpers.py) is loaded + fused by
diffusers, and ldm's merged weights and image must agree; conversions to kohya and back keep
every ΔW; keys that fit nothing are reported; kohya's T5 names and ``ldm convert``. Files in
kohya's and ComfyUI's names are in test_sd3_lora_kohya.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sd3_lora_helpers import (  # noqa: F401 (fixtures)
    PARTS,
    RANK,
    _assert_same,
    _diffusers_fused,
    folder_fixture,
    peft_file_fixture,
)

from ldm.cli import main
from ldm.errors import LdmError
from ldm.formats.diffusers_folder import load_folder
from ldm.formats.lora import (
    LoraModule,
    apply_lora,
    convert_lora,
    load_lora,
    resolve_lora,
    save_kohya_lora,
)
from ldm.formats.safe_load import load_state_dict, save_state_dict
from ldm.pipeline import load_pipeline

SETTINGS = dict(steps=3, guidance_scale=4.0, height=32, width=32)
PROMPT = "a red circle"


# --- (1) diffusers/PEFT ---------------------------------------------------------------------


def test_peft_file_merges_as_diffusers_fuses_it(folder, peft_file):
    keys = load_state_dict(peft_file)
    assert any(k.startswith("transformer.transformer_blocks.1.attn.to_q.lora_A") for k in keys)
    parts, base = load_folder(folder), load_folder(folder)
    report = apply_lora(parts, peft_file)
    assert report.warning() is None and len(report.matched) == len(keys) // 2
    assert load_lora(peft_file).format == "diffusers"
    # each pair moves one weight; the rest (biases, norms, position table) stay
    assert _assert_same(parts, _diffusers_fused(folder, peft_file), base) == len(keys) // 2


def test_image_with_peft_lora_equals_diffusers(folder, peft_file):
    from diffusers import StableDiffusion3Pipeline

    pipe = load_pipeline(folder)
    assert pipe.apply_lora(peft_file).warning() is None
    (out,) = pipe([PROMPT], [1], **SETTINGS)
    theirs = StableDiffusion3Pipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(peft_file))  # unfused: the adapters run as layers
    s = dict(SETTINGS)
    ref = theirs(PROMPT, num_inference_steps=s.pop("steps"),
                 generator=torch.Generator().manual_seed(1), **s).images[0]  # fmt: skip
    plain = load_pipeline(folder)([PROMPT], [1], **SETTINGS)[0].image
    ours, ref = (np.asarray(i, dtype=np.int16) for i in (out.image, ref))
    assert np.abs(ours - ref).max() <= 2
    assert np.abs(ours - np.asarray(plain, dtype=np.int16)).max() > 2  # the LoRA mattered


# --- (2) conversions, reports, T5 -----------------------------------------------------------


def test_round_trip_keeps_the_weights(folder, peft_file, tmp_path):
    kohya, back, again = (tmp_path / f"{n}.safetensors" for n in ("k", "k2d", "k2d2k"))
    convert_lora(load_folder(folder), peft_file, kohya, "kohya")
    convert_lora(load_folder(folder), kohya, back, "diffusers")
    convert_lora(load_folder(folder), back, again, "kohya")
    peft, diffusers = load_state_dict(peft_file), load_state_dict(back)
    assert diffusers.keys() == peft.keys()  # the fused qkv pairs split back to to_q/k/v
    for key, value in peft.items():  # ranks recovered; alpha / rank = 2 folded into lora_B
        torch.testing.assert_close(diffusers[key], value * (2 if ".lora_B." in key else 1))
    parts, base = load_folder(folder), load_folder(folder)
    assert apply_lora(parts, back).warning() is None
    assert _assert_same(parts, _diffusers_fused(folder, back), base) == len(peft) // 2
    first, last = (resolve_lora(base, p)[0] for p in (kohya, again))
    assert [p.name for p, _ in first] == [p.name for p, _ in last]
    for (a, _), (b, _) in zip(first, last):
        torch.testing.assert_close(a.delta(), b.delta(), rtol=1e-5, atol=1e-7)


def test_partial_qkv_pairs_fuse_and_split_back(folder, tmp_path):
    """to_q and to_v with different ranks and alphas, no to_k: one fused kohya pair, whose
    split gives back exactly the two pairs (ranks, ΔW) and nothing for to_k."""
    parts = load_folder(folder)
    d = parts.unet.config.width
    gen = torch.Generator().manual_seed(2)
    attn = "transformer_blocks.1.attn"
    pairs = [
        LoraModule("unet", f"{attn}.to_q", torch.randn(2, d, generator=gen),
                   torch.randn(d, 2, generator=gen), alpha=1.0),
        LoraModule("unet", f"{attn}.to_v", torch.randn(3, d, generator=gen),
                   torch.randn(d, 3, generator=gen), alpha=6.0),
    ]  # fmt: skip
    path = save_kohya_lora(pairs, tmp_path / "qv.safetensors", unet_config=parts.unet.config)
    state = load_state_dict(path)
    assert {k.split(".")[0] for k in state} == {"lora_unet_joint_blocks_1_x_block_attn_qkv"}
    resolved, report = resolve_lora(parts, path)
    assert report.warning() is None and report.matched == [f"unet.{attn}.to_q", f"unet.{attn}.to_v"]
    for (got, _), want in zip(resolved, pairs):
        assert got.rank == want.rank
        torch.testing.assert_close(got.delta(), want.delta())


def test_unmatched_and_misfit_keys_are_reported(folder, peft_file, tmp_path):
    state = load_state_dict(peft_file)
    d = load_folder(folder).unet.config.width
    state |= {
        "transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(RANK, d),
        "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(d, RANK),
        # a fused qkv pair two thirds high does not fit to_q + to_k + to_v
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(RANK, d),
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(2 * d, RANK),
        "lora_unet_joint_blocks_0_x_block_mlp_fc1.hada_w1_a": torch.zeros(RANK, d),  # LoHa
    }
    path = tmp_path / "extra.safetensors"
    save_state_dict(state, path)
    report = apply_lora(load_folder(folder), path)
    assert sorted(report.unmatched) == [
        "lora_unet_joint_blocks_0_x_block_mlp_fc1.hada_w1_a",
        "transformer.transformer_blocks.7.attn.to_q.lora_A.weight",
        "transformer.transformer_blocks.7.attn.to_q.lora_B.weight",
    ]
    assert len(report.mismatched) == 1 and "x 3" in report.mismatched[0]
    assert "3 keys matched nothing" in report.warning()
    with pytest.raises(LdmError, match="not converted"):
        convert_lora(load_folder(folder), path, tmp_path / "no.safetensors", "kohya")
    assert not (tmp_path / "no.safetensors").exists()


def test_t5_pairs_and_the_convert_cli(folder, peft_file, tmp_path, capsys):
    parts, base = load_folder(folder), load_folder(folder)
    q = base.text_encoder_3.get_submodule("encoder.block.0.layer.0.SelfAttention.q").weight
    gen = torch.Generator().manual_seed(5)
    down, up = torch.randn(RANK, q.shape[1], generator=gen), torch.randn(q.shape[0], RANK)
    state = load_state_dict(peft_file) | {
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": down,
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": up,
    }  # kohya's T5 names (networks/lora_sd3.py, train_t5xxl); alpha absent: alpha = rank
    path = tmp_path / "with_t5.safetensors"
    save_state_dict(state, path)
    assert apply_lora(parts, path).warning() is None
    moved = parts.text_encoder_3.get_submodule("encoder.block.0.layer.0.SelfAttention.q").weight
    torch.testing.assert_close(moved - q, up @ down)

    kohya, back = tmp_path / "cli_k.safetensors", tmp_path / "cli_d.safetensors"
    for src, dst, to in ((path, kohya, "lora-kohya"), (kohya, back, "lora-diffusers")):
        assert main(["convert", str(src), str(dst), "--to", to, "--model", str(folder)]) == 0
    said = capsys.readouterr().out
    assert "(kohya LoRA," in said and "(diffusers LoRA," in said
    keys = load_state_dict(kohya).keys()
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.alpha" in keys
    assert "lora_unet_joint_blocks_1_context_block_attn_qkv.lora_up.weight" in keys
    keys = load_state_dict(back).keys()
    assert "transformer.transformer_blocks.1.attn.add_k_proj.lora_A.weight" in keys
    assert "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight" in keys
    again = load_folder(folder)
    assert apply_lora(again, back).warning() is None
    for part in (*PARTS, "text_encoder_3"):
        for key, value in getattr(again, part).state_dict().items():
            torch.testing.assert_close(value, getattr(parts, part).state_dict()[key], msg=key)
