"""SDXL LoRA files in diffusers/PEFT names, and files whose keys do not all apply.

The reference is diffusers' own loader (``StableDiffusionXLPipeline.load_lora_weights`` and
``fuse_lora``) on the same tiny SDXL-shaped folder: a file written as diffusers' training script
writes it, and one written by ldm (round-tripped through kohya), merge as diffusers merges them.
Keys that fit nothing are reported (ComfyUI's and diffusers' older names apply). kohya's own
names: test_sdxl_lora.py.
"""

from __future__ import annotations

import pytest
import torch
from sdxl_lora_helpers import (
    PARTS,
    RANK,
    _assert_same_weights,
    _diffusers_merged,
    _every_module_lora,
    _pair,
    _text_module,
)

from ldm.errors import LdmError
from ldm.formats.diffusers_folder import load_folder
from ldm.formats.lora import (
    apply_lora,
    convert_lora,
    load_lora,
    resolve_lora,
    save_diffusers_lora,
    save_kohya_lora,
)
from ldm.formats.safe_load import load_state_dict, save_state_dict

# --- (1) diffusers/PEFT SDXL files ------------------------------------------------------------


def test_diffusers_trained_sdxl_file_applies_fully(tiny_sdxl, tmp_path):
    """A file written the way diffusers' train_dreambooth_lora_sdxl.py writes it (alpha != rank,
    adapter metadata, U-Net + both encoders) applies in ldm as diffusers applies it."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    # the script's targets: with others (proj_in, conv1) convert_state_dict_to_diffusers writes a
    # file that mixes .lora.down and lora_A spellings, and diffusers 0.42 then loads only the
    # lora_A half without a word (ldm reads both; see docs/lora.md)
    unet_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    text_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    torch.manual_seed(7)  # init_lora_weights=False: random lora_B, so every adapter acts
    layers, metadata = {}, {}
    for part, targets, alpha in (("unet", unet_targets, 3), ("text_encoder", text_targets, 5),
                                 ("text_encoder_2", text_targets, 1)):  # fmt: skip
        module = getattr(pipe, part)  # (transformers' add_adapter wants peft >= 0.22)
        config = LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        inject_adapter_in_model(config, module)
        layers[f"{part}_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(module)
        )
        metadata[f"{part}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, **layers, **metadata)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    count = len(load_state_dict(path)) // 2

    parts, base = load_folder(tiny_sdxl), load_folder(tiny_sdxl)
    report = apply_lora(parts, path)
    assert report.warning() is None and len(report.matched) == count
    assert {m.split(".")[0] for m in report.matched} == set(PARTS)
    assert load_lora(path).format == "diffusers"
    reference = _diffusers_merged(tiny_sdxl, path)
    assert _assert_same_weights(parts, reference, base) == count


def test_diffusers_sdxl_file_written_by_ldm_and_round_trips(tiny_sdxl, tmp_path):
    parts, base = load_folder(tiny_sdxl), load_folder(tiny_sdxl)
    modules = _every_module_lora(parts, seed=1)
    path = save_diffusers_lora(modules, tmp_path / "d.safetensors")
    keys = set(load_state_dict(path))
    assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.lora_A.weight" in keys
    assert "text_encoder_2.text_projection.lora_B.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "unet.add_embedding.linear_1.lora_B.weight" in keys
    report = apply_lora(parts, path)
    assert report.warning() is None and len(report.matched) == len(modules)
    assert _assert_same_weights(parts, _diffusers_merged(tiny_sdxl, path), base) == len(modules)

    # kohya -> diffusers -> kohya: the same keys and the same ΔW for every module
    kohya = save_kohya_lora(modules, tmp_path / "k.safetensors", unet_config=base.unet.config)
    convert_lora(base, kohya, tmp_path / "k2d.safetensors", "diffusers")
    convert_lora(base, tmp_path / "k2d.safetensors", tmp_path / "k2d2k.safetensors", "kohya")
    first, again = (resolve_lora(base, p)[0] for p in (kohya, tmp_path / "k2d2k.safetensors"))
    assert set(load_state_dict(kohya)) == set(load_state_dict(tmp_path / "k2d2k.safetensors"))
    assert [(a.part, a.name) for a, _ in first] == [(b.part, b.name) for b, _ in again]
    for (a, _), (b, _) in zip(first, again):
        torch.testing.assert_close(a.delta(), b.delta(), rtol=1e-6, atol=1e-7)


# --- (2) keys that do not apply are reported --------------------------------------------------


def test_unmatched_sdxl_keys_are_reported_and_comfyui_names_apply(tiny_sdxl, tmp_path):
    parts = load_folder(tiny_sdxl)
    gen = torch.Generator().manual_seed(9)
    proj_in = parts.unet.get_submodule("down_blocks.1.attentions.0.proj_in")  # Linear 64 -> 64
    q = _text_module(parts.text_encoder, "encoder.layers.0.self_attn.q_proj")  # 32 -> 32
    fc2 = _text_module(parts.text_encoder_2, "encoder.layers.1.mlp.fc2")  # 64 -> 32
    before = [m.weight.clone() for m in (proj_in, q, fc2)]
    out = parts.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0")
    before.append(out.weight.clone())
    good = {
        "diffusion_model.input_blocks.3.1.proj_in": proj_in,  # ComfyUI's own LoRA names
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj": q,
        "text_encoders.clip_g.transformer.text_model.encoder.layers.1.mlp.fc2": fc2,
        "lycoris_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_out_0": out,
    }
    state, pairs = {}, []
    for stem, module in good.items():
        down, up = _pair(module.weight, gen)
        state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                  f"{stem}.alpha": torch.tensor(1.0)}  # fmt: skip
        pairs.append((module, down, up))
    ghost = torch.randn(2, 64, generator=gen), torch.randn(64, 2, generator=gen)
    bad = {
        "lora_unet_input_blocks_9_1_proj_in": ghost,  # no such block
        "lora_te2_text_model_encoder_layers_5_mlp_fc1": ghost,  # bigG here has 3 layers
        "lora_te3_text_model_encoder_layers_0_mlp_fc1": ghost,  # no third encoder in SDXL
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": ghost,  # 64 wide: wrong shape
    }
    for stem, (down, up) in bad.items():
        state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
    state["lora_unet_input_blocks_3_1_proj_in.dora_scale"] = torch.ones(64)  # DoRA: not LoRA
    path = tmp_path / "mixed.safetensors"
    save_state_dict(state, path)

    report = apply_lora(parts, path, scale=0.8)
    assert sorted(m.replace("text_model.", "") for m in report.matched) == [
        "text_encoder.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.encoder.layers.1.mlp.fc2",
        "unet.down_blocks.1.attentions.0.proj_in",
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0",
    ]
    assert sorted(report.unmatched) == sorted(
        ["lora_unet_input_blocks_3_1_proj_in.dora_scale"]
        + [f"{s}.{w}.weight" for s in list(bad)[:3] for w in ("lora_down", "lora_up")]
    )
    assert len(report.mismatched) == 1 and "lora_te1_" in report.mismatched[0]
    assert "7 keys matched nothing in the model and 1 pair did not fit" in report.warning()
    for (module, down, up), old in zip(pairs, before):
        expected = old + 0.8 * (1.0 / RANK) * (up @ down)
        torch.testing.assert_close(module.weight, expected, rtol=1e-6, atol=1e-6)
    # diffusers' older attention-processor spelling, CLIP included
    unet_stem = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    clip_stem = "text_encoder_2.text_model.encoder.layers.2.self_attn.to_v_lora"
    old = {f"{unet_stem}.down.weight": ghost[0], f"{unet_stem}.up.weight": ghost[1]}
    old |= {f"{clip_stem}.down.weight": ghost[0][:, :32], f"{clip_stem}.up.weight": ghost[1][:32]}
    save_state_dict(old, tmp_path / "old.safetensors")
    report = apply_lora(load_folder(tiny_sdxl), tmp_path / "old.safetensors")
    assert report.warning() is None
    assert sorted(m.replace("text_model.", "") for m in report.matched) == [
        "text_encoder_2.encoder.layers.2.self_attn.v_proj",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    ]
    with pytest.raises(LdmError, match="not converted"):
        convert_lora(parts, path, tmp_path / "out.safetensors", "kohya")
    assert not (tmp_path / "out.safetensors").exists()
