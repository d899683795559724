"""SD3 LoRA files: diffusers/PEFT (``transformer.``), kohya (sd-scripts networks/lora_sd3.py:
``lora_unet_`` + the original MMDiT names, q/k/v fused) and ComfyUI (``diffusion_model.``).

References, none of them ldm's tables: the diffusers file is made by peft and
``StableDiffusion3Pipeline.save_lora_weights`` and loaded + fused by diffusers; a kohya file is
built from the original MMDiT's module list (written here from sd-scripts library/sd3_models.py)
and its ΔW, as an original-keyed checkpoint, is renamed by diffusers' own single-file converter
(``convert_sd3_transformer_checkpoint_to_diffusers``: qkv split, adaLN halves swapped).
diffusers 0.42 has no kohya SD3 LoRA converter (lora_conversion_utils), so it cannot load them.
The tiny transformer is 3.5-medium-shaped (a dual-attention block, RMS q/k norm) with 2 blocks,
so the last block's context_pre_only modules are covered too.
"""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import torch
from tiny_sd3 import make_tiny_sd3

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
from ldm.formats.safe_load import load_state_dict, read_safetensors_header, save_state_dict
from ldm.pipeline import load_pipeline

RANK, ALPHA = 4, 8.0  # alpha != rank: every reader must apply alpha / rank = 2
PARTS = ("unet", "text_encoder", "text_encoder_2")  # ldm's names; diffusers': transformer, ...
# every Linear / Conv2d of diffusers' SD3Transformer2DModel, by peft's suffix rule
TRANSFORMER_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "net.0.proj", "net.2", "linear", "linear_1", "linear_2", "context_embedder", "proj_out",
    "pos_embed.proj",
]  # fmt: skip
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
SHAPE = dict(dual_attention_layers=(0,), qk_norm="rms_norm")  # 3.5-medium-shaped
SETTINGS = dict(steps=3, guidance_scale=4.0, height=32, width=32)
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_sd3(tmp_path_factory.mktemp("sd35_lora"), seed=4, transformer=SHAPE)


def _randomised(model, targets: list[str], seed: int) -> tuple[dict, dict]:
    """peft's adapter on ``model`` with random (small) lora_B: its state dict and config."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets)
    inject_adapter_in_model(config, model)
    state = get_peft_model_state_dict(model)
    gen = torch.Generator().manual_seed(seed)
    for key, value in state.items():  # peft zeroes lora_B: a random update instead
        fan_in = value[0].numel()
        size = 0.5 / fan_in**0.5 if ".lora_B." in key else 1.0 / fan_in**0.5
        state[key] = size * torch.randn(value.shape, generator=gen)
    return state, config.to_dict()


@pytest.fixture(scope="module")
def peft_file(folder, tmp_path_factory):
    """What a diffusers SD3 LoRA script writes: transformer + both CLIPs, alpha in metadata."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    layers, meta = {}, {}
    for i, (part, targets) in enumerate(
        [("transformer", TRANSFORMER_TARGETS), ("text_encoder", CLIP_TARGETS),
         ("text_encoder_2", CLIP_TARGETS)]
    ):  # fmt: skip
        layers[f"{part}_lora_layers"], config = _randomised(getattr(pipe, part), targets, i)
        meta[f"{part}_lora_adapter_metadata"] = config
    out = tmp_path_factory.mktemp("peft")
    StableDiffusion3Pipeline.save_lora_weights(out, **layers, **meta)
    return out / "pytorch_lora_weights.safetensors"


def _diffusers_fused(folder, lora_file) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers loads and fuses ``lora_file``: state dicts under ldm's part names."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(lora_file))
    components = ["transformer", "text_encoder", "text_encoder_2"]
    pipe.fuse_lora(components=components, lora_scale=1.0)
    pipe.unload_lora_weights()
    return {ours: getattr(pipe, theirs).state_dict() for ours, theirs in zip(PARTS, components)}


def _assert_same(parts, reference: dict, base) -> int:
    """Every tensor of ldm's parts equals the reference; returns how many the LoRA moved."""
    moved = 0
    for part in PARTS:
        mine, before = getattr(parts, part).state_dict(), getattr(base, part).state_dict()
        assert mine.keys() == reference[part].keys()
        for key, value in mine.items():
            torch.testing.assert_close(value, reference[part][key], rtol=1e-5, atol=1e-6, msg=key)
            moved += not torch.equal(value, before[key])
    return moved


def _delta(a: dict, b: dict) -> dict[str, torch.Tensor]:
    return {k: a[k] - b[k] for k in a}


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


# --- (2) kohya ------------------------------------------------------------------------------


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


# --- (3) conversions, reports, T5 -----------------------------------------------------------


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


# --- (4) kohya's own code (opt-in: LDM_SD_SCRIPTS=<sd-scripts checkout>) -----------------------


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
