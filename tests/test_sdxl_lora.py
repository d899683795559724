"""SDXL LoRA files in kohya's names (sgm block names, lora_te1_/lora_te2_; the refiner's bigG).

The reference is diffusers' own loader (``StableDiffusionXLPipeline.load_lora_weights`` and
``fuse_lora``) on the same tiny SDXL-shaped folder: every key of a file must land in both, and the
merged weights (and the image) must agree. Independent kohya-named files are built here from
kohya's naming rules (sd-scripts networks/lora.py on library/sdxl_original_unet.py), not from
ldm's tables. diffusers/PEFT files and unmatched keys: test_sdxl_lora_diffusers.py.
"""

from __future__ import annotations

import re

import torch
from kohya_names import CLIP, sgm_unet_modules
from sdxl_lora_helpers import (
    PARTS,
    RANK,
    _assert_same_weights,
    _diffusers_merged,
    _every_module_lora,
    _pair,
    _text_module,
)

from ldm.formats.diffusers_folder import load_folder
from ldm.formats.lora import LoraModule, apply_lora, load_lora, save_kohya_lora
from ldm.formats.safe_load import load_state_dict, read_safetensors_header, save_state_dict

# --- (1) a kohya SDXL file written by ldm ---------------------------------------------------


def test_kohya_sdxl_made_by_ldm_loads_fully_in_diffusers(tiny_sdxl, tmp_path):
    parts, base = load_folder(tiny_sdxl), load_folder(tiny_sdxl)
    modules = _every_module_lora(parts)
    path = save_kohya_lora(modules, tmp_path / "k.safetensors", unet_config=parts.unet.config)
    keys = set(load_state_dict(path))
    assert len(keys) == 3 * len(modules)
    unet_keys = {k for k in keys if k.startswith("lora_unet_")}
    # kohya's SDXL names: sgm blocks, never diffusers' (down_blocks / mid_block / up_blocks)
    assert not any(b in k for k in unet_keys for b in ("down_blocks", "mid_block", "up_blocks"))
    for stem in ("input_blocks_0_0", "input_blocks_2_0_op", "input_blocks_3_0_skip_connection",
                 "input_blocks_3_1_transformer_blocks_1_attn2_to_k", "middle_block_1_proj_in",
                 "output_blocks_1_2_conv", "output_blocks_3_0_emb_layers_1", "label_emb_0_2",
                 "time_embed_0", "out_2"):  # fmt: skip
        assert f"lora_unet_{stem}.lora_down.weight" in keys, stem
    assert "lora_te1_text_model_encoder_layers_2_mlp_fc2.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight" in keys
    assert "lora_te2_text_projection.lora_down.weight" in keys
    assert not any(k.startswith("lora_te_") for k in keys)
    header = read_safetensors_header(path)["__metadata__"]
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"

    report = apply_lora(parts, path)
    assert report.warning() is None and len(report.matched) == len(modules)
    reference = _diffusers_merged(tiny_sdxl, path)
    # every LoRA'd weight moved, in ldm as in diffusers, by the same amount
    assert _assert_same_weights(parts, reference, base) == len(modules)
    assert load_lora(path).format == "kohya"


# --- (2) a kohya SDXL file built from kohya's naming rules -----------------------------------


def _diffusers_module(stem: str, unet_config) -> str:
    """The module diffusers' own kohya converter gives ``stem``: "unet.down_blocks....to_q"."""
    from diffusers import StableDiffusionXLPipeline

    one = {
        f"{stem}.lora_down.weight": torch.zeros(RANK, 1),
        f"{stem}.lora_up.weight": torch.zeros(1, RANK),
    }
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(one, unet_config=unet_config)
    (key,) = [k for k in converted if ".down." in k]
    for suffix in (".lora.down.weight", "_lora.down.weight", ".lora_linear_layer.down.weight"):
        key = key.removesuffix(suffix)
    key = key.replace(".processor.", ".")  # diffusers' attention-processor spelling
    if key.startswith("unet."):
        return key + ".0" if key.endswith(".to_out") else key
    return re.sub(r"self_attn\.to_(q|k|v|out)$", r"self_attn.\1_proj", key)


def _kohya_file(folder, path, seed: int = 3) -> dict[str, str]:
    """Write a kohya SDXL LoRA on every module kohya can target (U-Net with conv_dim set, CLIP
    attention + MLP of both encoders). Names from kohya's rules; the module each names (and so
    the shapes) from diffusers' converter, so ldm's tables play no part. Returns stem -> module.
    """
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    config = dict(pipe.unet.config)
    depth = config["transformer_layers_per_block"]
    n = len(config["block_out_channels"])
    config["transformer_layers_per_block"] = (
        list(depth) if isinstance(depth, list | tuple) else [depth] * n
    )
    stems = ["lora_unet_" + m.replace(".", "_") for m in sgm_unet_modules(config)]
    for te, part in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        layers = getattr(pipe, part).config.num_hidden_layers
        stems += [f"{te}text_model_encoder_layers_{i}_{m.replace('.', '_')}"
                  for i in range(layers) for m in CLIP]  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    state, targets = {}, {}
    # one alpha for every module, as kohya writes network_alpha: diffusers (0.42) drops per-module
    # alphas of attention projections when they differ ("alpha_pattern keys ... ignored")
    for stem in stems:
        targets[stem] = _diffusers_module(stem, pipe.unet.config)
        part, _, name = targets[stem].partition(".")
        model, name = getattr(pipe, part), name.removeprefix("text_model.")
        module = model.get_submodule(name) if part == "unet" else _text_module(model, name)
        down, up = _pair(module.weight, gen)
        state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                  f"{stem}.alpha": torch.tensor(3.0)}  # fmt: skip
    save_state_dict(state, path)
    return targets


def test_kohya_sgm_file_from_kohya_rules_applies_fully(tiny_sdxl, tmp_path):
    """A kohya SDXL file named as kohya names it loads in ldm with every key applied."""
    path = tmp_path / "kohya_rules.safetensors"
    targets = _kohya_file(tiny_sdxl, path)
    assert len(set(targets.values())) == len(targets)  # each name reaches its own module
    parts, base = load_folder(tiny_sdxl), load_folder(tiny_sdxl)
    report = apply_lora(parts, path)
    assert report.warning() is None
    # ... the module diffusers picks (transformers >= 5 has no text_model level in CLIPTextModel)
    flat = sorted(t.replace("text_model.", "") for t in targets.values())
    assert sorted(m.replace("text_model.", "") for m in report.matched) == flat
    reference = _diffusers_merged(tiny_sdxl, path)
    assert _assert_same_weights(parts, reference, base) == len(targets)


# --- (3) the refiner's kohya names ----------------------------------------------------------


def test_refiner_kohya_names(tiny_sdxl_refiner, tmp_path):
    """The refiner has bigG alone: ldm writes lora_te2_, and reads ComfyUI's lora_te_ for it."""
    parts = load_folder(tiny_sdxl_refiner)
    assert parts.text_encoder is None
    gen = torch.Generator().manual_seed(2)
    modules = []
    for part in ("unet", "text_encoder_2"):
        for name, module in getattr(parts, part).named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                modules.append(LoraModule(part, name, *_pair(module.weight, gen)))
    path = save_kohya_lora(modules, tmp_path / "r.safetensors", unet_config=parts.unet.config)
    keys = set(load_state_dict(path))
    assert {k.split("_")[1] for k in keys} == {"unet", "te2"}
    report = apply_lora(parts, path)
    assert report.warning() is None and len(report.matched) == len(modules)
    q = "text_model_encoder_layers_0_self_attn_q_proj"
    weight = _text_module(parts.text_encoder_2, "encoder.layers.0.self_attn.q_proj")
    down, up = _pair(weight.weight, gen)
    save_state_dict({f"lora_te_{q}.lora_down.weight": down, f"lora_te_{q}.lora_up.weight": up},
                    tmp_path / "te.safetensors")  # fmt: skip
    report = apply_lora(parts, tmp_path / "te.safetensors")
    assert [m.replace("text_model.", "") for m in report.matched] == [
        "text_encoder_2.encoder.layers.0.self_attn.q_proj"
    ]


# --- (1b) the image ---------------------------------------------------------------------------


def _kohya_default_lora(parts, seed: int) -> list[LoraModule]:
    """What kohya trains by default: U-Net transformer Linears, CLIP attention and MLP."""
    gen = torch.Generator().manual_seed(seed)
    modules = []
    for part in PARTS:
        for name, module in getattr(parts, part).named_modules():
            wanted = (".attentions." in name) if part == "unet" else (".layers." in name)
            if wanted and isinstance(module, torch.nn.Linear):
                # small enough that the tiny model stays smooth (fp32 rounding not amplified)
                down, up = _pair(module.weight, gen, size=0.1 / module.weight.shape[1] ** 0.5)
                modules.append(LoraModule(part, name, down, up, alpha=4.0))  # scale 2
    return modules


def test_kohya_sdxl_lora_gives_diffusers_image(tiny_sdxl, tmp_path):
    import numpy as np
    from diffusers import StableDiffusionXLPipeline

    from ldm.pipeline import load_pipeline

    size, steps, seed, prompt = 32, 4, 21, "a red circle above a blue square"
    kwargs = dict(steps=steps, height=size, width=size, sampler="euler", guidance_scale=5.0)
    pipe, plain_pipe = (load_pipeline(str(tiny_sdxl), "cpu", "fp32", "off") for _ in range(2))
    modules = _kohya_default_lora(pipe.parts, seed=5)
    path = save_kohya_lora(modules, tmp_path / "k.safetensors", unet_config=pipe.parts.unet.config)
    report = pipe.apply_lora(path, 0.8)
    assert report.warning() is None and len(report.matched) == len(modules)
    (ours,) = pipe([prompt], [seed], **kwargs)
    (plain,) = plain_pipe([prompt], [seed], **kwargs)

    theirs = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(path))
    theirs.fuse_lora(components=list(PARTS), lora_scale=0.8)
    expected = theirs(
        prompt, num_inference_steps=steps, height=size, width=size, guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]  # fmt: skip
    a, b, c = (np.asarray(i.image if hasattr(i, "image") else i, dtype=np.int16)
               for i in (ours, expected, plain))  # fmt: skip
    assert np.abs(a - b).max() <= 2
    assert np.abs(a - c).max() > 20  # the LoRA changed the image
