"""SD3 LoRA files in kohya's names (sd-scripts networks/lora_sd3.py: ``lora_unet_`` + the original
MMDiT names, q/k/v fused) and ComfyUI's (``diffusion_model.``).

References, none of them ldm's tables: diffusers' fused peft file (sd3_lora_helpers.py); a kohya
file built from the original MMDiT's module list (written here from sd-scripts
library/sd3_models.py) whose ΔW, as an original-keyed checkpoint, is renamed by diffusers' own
single-file converter (``convert_sd3_transformer_checkpoint_to_diffusers``: qkv split, adaLN
halves swapped); opt-in, sd-scripts' own LoRANetwork. diffusers 0.42 has no kohya SD3 LoRA
converter (lora_conversion_utils), so it cannot load them.
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from sd3_lora_helpers import (  # noqa: F401 (fixtures)
    ALPHA,
    RANK,
    _assert_same,
    _diffusers_fused,
    folder_fixture,
    peft_file_fixture,
)

from ldm.formats.diffusers_folder import load_folder
from ldm.formats.lora import LoraModule, apply_lora, convert_lora, save_kohya_lora
from ldm.formats.safe_load import load_state_dict, read_safetensors_header, save_state_dict


def _delta(a: dict, b: dict) -> dict[str, torch.Tensor]:
    return {k: a[k] - b[k] for k in a}


# --- (1) kohya ------------------------------------------------------------------------------


def test_kohya_file_by_converter_fuses_qkv_exactly(folder, peft_file, tmp_path):
    parts, base = load_folder(folder), load_folder(folder)
    kohya = tmp_path / "kohya.safetensors"
    convert_lora(load_folder(folder), peft_file, kohya, "kohya")
    state, peft = load_state_dict(kohya), load_state_dict(peft_file)
    assert not any(".to_q" in k or "transformer_blocks" in k for k in state)
    header = read_safetensors_header(kohya)["__metadata__"]
    assert header["ss_base_model_version"] == "5-medium"
    assert header["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"

    # hand-built expectation of the fused x_block qkv of block 0: downs stacked, ups on the
    # block diagonal, ΔW = cat(ΔW_q, ΔW_k, ΔW_v) by rows (alpha / rank = 2 on each)
    stem = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    A = [peft[f"transformer.transformer_blocks.0.attn.to_{p}.lora_A.weight"] for p in "qkv"]
    B = [peft[f"transformer.transformer_blocks.0.attn.to_{p}.lora_B.weight"] for p in "qkv"]
    down, up = state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"]
    assert torch.equal(down, torch.cat(A))
    assert torch.equal(up, torch.block_diag(*B))
    alpha = float(state[f"{stem}.alpha"])
    torch.testing.assert_close(
        alpha / down.shape[0] * up @ down, torch.cat([ALPHA / RANK * b @ a for a, b in zip(A, B)])
    )
    # the last block's context adaLN: original (shift, scale) = diffusers' (scale, shift) swapped
    stem = "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"
    b = peft["transformer.transformer_blocks.1.norm1_context.linear.lora_B.weight"]
    assert torch.equal(state[f"{stem}.lora_up.weight"], torch.cat(b.chunk(2)[::-1]))
    for name in ("x_block_attn2_qkv", "context_block_attn_qkv"):
        assert f"lora_unet_joint_blocks_0_{name}.lora_down.weight" in state
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha" in state

    report = apply_lora(parts, kohya)
    assert report.warning() is None
    assert _assert_same(parts, _diffusers_fused(folder, peft_file), base) == len(peft) // 2


def _original_modules(c: dict) -> dict[str, tuple[int, ...]]:
    """The original MMDiT's LoRA-able weights and their shapes, written from sd-scripts'
    library/sd3_models.py (MMDiT, SingleDiTBlock, AttentionLinears, MLP, FinalLayer)."""
    d, n, p = c["num_attention_heads"] * c["attention_head_dim"], c["num_layers"], c["patch_size"]
    shapes = {
        "x_embedder.proj": (d, c["in_channels"], p, p),
        "t_embedder.mlp.0": (d, 256), "t_embedder.mlp.2": (d, d),
        "y_embedder.mlp.0": (d, c["pooled_projection_dim"]), "y_embedder.mlp.2": (d, d),
        "context_embedder": (d, c["joint_attention_dim"]),
        "final_layer.linear": (p * p * c["out_channels"], d),
        "final_layer.adaLN_modulation.1": (2 * d, d),
    }  # fmt: skip
    for i in range(n):
        for block in ("x_block", "context_block"):
            pre_only = block == "context_block" and i == n - 1
            dual = block == "x_block" and i in c["dual_attention_layers"]
            s = f"joint_blocks.{i}.{block}"
            mods = 2 if pre_only else 9 if dual else 6
            shapes |= {f"{s}.attn.qkv": (3 * d, d), f"{s}.adaLN_modulation.1": (mods * d, d)}
            if not pre_only:
                shapes |= {f"{s}.attn.proj": (d, d), f"{s}.mlp.fc1": (4 * d, d),
                           f"{s}.mlp.fc2": (d, 4 * d)}  # fmt: skip
            if dual:
                shapes |= {f"{s}.attn2.qkv": (3 * d, d), f"{s}.attn2.proj": (d, d)}
    return shapes


def test_kohya_file_from_original_names_equals_diffusers_conversion(folder, tmp_path):
    """kohya's names and shapes, written independently; diffusers' checkpoint converter says
    where each ΔW lands in diffusers' transformer (qkv split, adaLN halves swapped)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    parts, base = load_folder(folder), load_folder(folder)
    c = parts.unet.config.to_diffusers()
    gen = torch.Generator().manual_seed(11)
    kohya, comfy, checkpoint = {}, {}, _original_zeros(c)
    for name, shape in _original_modules(c).items():
        down = torch.randn(RANK, *shape[1:], generator=gen) / shape[1] ** 0.5
        up = 0.1 * torch.randn(shape[0], RANK, *([1, 1] if len(shape) == 4 else []), generator=gen)
        pair = {".lora_down.weight": down, ".lora_up.weight": up, ".alpha": torch.tensor(ALPHA)}
        kohya |= {"lora_unet_" + name.replace(".", "_") + k: v for k, v in pair.items()}
        comfy |= {f"diffusion_model.{name}{k}": v for k, v in pair.items()}
        checkpoint[f"{name}.weight"] = (ALPHA / RANK * up.flatten(1) @ down.flatten(1)).reshape(
            shape
        )
    expected = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    save_state_dict(kohya, tmp_path / "kohya.safetensors")
    save_state_dict(comfy, tmp_path / "comfy.safetensors")

    report = apply_lora(parts, tmp_path / "kohya.safetensors")
    assert report.warning() is None
    delta = _delta(parts.unet.state_dict(), base.unet.state_dict())
    assert delta.keys() == expected.keys()
    for key, value in delta.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    # ComfyUI's own LoRA files: the same pairs under diffusion_model.<original path>
    again = load_folder(folder)
    assert apply_lora(again, tmp_path / "comfy.safetensors").warning() is None
    for key, value in again.unet.state_dict().items():
        assert torch.equal(value, parts.unet.state_dict()[key]), key


def _original_zeros(c: dict) -> dict[str, torch.Tensor]:
    """The rest of an original checkpoint as zeros (biases, q/k norms, position table): the
    converter needs every key; a LoRA moves none of them."""
    d, side = c["num_attention_heads"] * c["attention_head_dim"], c["pos_embed_max_size"]
    zeros = {"pos_embed": torch.zeros(1, side * side, d)}
    zeros |= {f"{name}.bias": torch.zeros(shape[0]) for name, shape in _original_modules(c).items()}
    for i in range(c["num_layers"]):
        attns = ["x_block.attn", "context_block.attn"]
        attns += ["x_block.attn2"] * (i in c["dual_attention_layers"])
        for attn in attns:
            for ln in ("ln_q", "ln_k"):
                zeros[f"joint_blocks.{i}.{attn}.{ln}.weight"] = torch.zeros(c["attention_head_dim"])
    return zeros


# --- (2) kohya's own code (opt-in: LDM_SD_SCRIPTS=<sd-scripts checkout>) -----------------------


@pytest.mark.skipif(not os.environ.get("LDM_SD_SCRIPTS"), reason="LDM_SD_SCRIPTS: sd-scripts")
def test_kohya_sd_scripts_makes_and_loads_exactly_our_sd3_names(tmp_path):
    """sd-scripts' SD3 LoRANetwork (every module it can train: emb_dims set) on its MMDiT with
    SD3.5-medium's real shapes (meta device) names exactly the modules ldm writes, and its
    loader takes every key of ldm's file."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ldm.models.families import FAMILIES
    from ldm.models.mmdit import SD3Config, SD3Transformer2DModel

    sys.path.insert(0, os.environ["LDM_SD_SCRIPTS"])
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))  # image I/O only, not the LoRA path
    from library import sd3_models
    from networks import lora_sd3 as kohya

    configs = FAMILIES["sd3"].single_file  # the public SD3.5-medium configs
    c = configs["transformer"]
    params = sd3_models.SD3Params(
        patch_size=2, depth=c["num_layers"], num_patches=c["pos_embed_max_size"] ** 2,
        pos_embed_max_size=c["pos_embed_max_size"], adm_in_channels=c["pooled_projection_dim"],
        qk_norm="rms", x_block_self_attn_layers=list(c["dual_attention_layers"]),
        context_embedder_in_features=c["joint_attention_dim"],
        context_embedder_out_features=c["caption_projection_dim"], model_type="5-medium",
    )  # fmt: skip
    clip = {k: CLIPTextConfig(**{n: v for n, v in configs[k].items() if n != "architectures"})
            for k in ("text_encoder", "text_encoder_2")}  # fmt: skip
    with torch.device("meta"):
        mmdit = sd3_models.create_sd3_mmdit(params)
        te1, te2 = (CLIPTextModelWithProjection(clip[k]) for k in clip)
        ours = SD3Transformer2DModel(SD3Config.from_diffusers(c))
    network = kohya.create_network(1.0, 1, 1.0, None, [te1, te2], mmdit, emb_dims="[1,1,1,1,1,1]")
    theirs = {m.lora_name for m in network.text_encoder_loras + network.unet_loras}

    modules = []
    for part, model in (("unet", ours), ("text_encoder", te1), ("text_encoder_2", te2)):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and "projection" not in name:
                w = module.weight
                up = torch.zeros(w.shape[0], 1, *([1, 1] if w.ndim == 4 else []))
                modules.append(LoraModule(part, name, torch.zeros(1, *w.shape[1:]), up, 1.0))
    path = save_kohya_lora(modules, tmp_path / "sd35.safetensors", unet_config=ours.config)
    state = load_state_dict(path)
    assert {k.split(".")[0] for k in state} == theirs
    assert len(theirs) == 271 + 72 + 192  # transformer, CLIP-L (12 x 6), CLIP-G (32 x 6)
    loaded, _ = kohya.create_network_from_weights(
        1.0, None, None, [te1, te2], mmdit, weights_sd=dict(state), for_inference=True
    )
    loaded.apply_to([te1, te2], mmdit, True, True)
    result = loaded.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
