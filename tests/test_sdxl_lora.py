"""SDXL LoRA files: kohya (sgm block names, lora_te1_/lora_te2_), diffusers/PEFT and ComfyUI names.

The reference is diffusers' own loader (``StableDiffusionXLPipeline.load_lora_weights`` and
``fuse_lora``) on the same tiny SDXL-shaped folder: every key of a file must land in both, and the
merged weights must agree. Independent kohya-named files are built here from kohya's naming rules
(sd-scripts networks/lora.py on library/sdxl_original_unet.py), not from ldm's tables.
"""

from __future__ import annotations

import logging
import re
import warnings

import pytest
import torch
from kohya_names import CLIP, sgm_unet_modules

from ldm.errors import LdmError
from ldm.formats.diffusers_folder import load_folder
from ldm.formats.lora import (
    LoraModule,
    apply_lora,
    convert_lora,
    load_lora,
    resolve_lora,
    save_diffusers_lora,
    save_kohya_lora,
)
from ldm.formats.safe_load import load_state_dict, read_safetensors_header, save_state_dict

PARTS = ("unet", "text_encoder", "text_encoder_2")
RANK = 2


def _pair(weight: torch.Tensor, gen: torch.Generator, size: float = 0.1):
    """A random (down, up) for ``weight``; kxk convolutions as kohya's LoCon (1x1 up)."""
    down = torch.randn(RANK, *weight.shape[1:], generator=gen)
    up = size * torch.randn(
        weight.shape[0], RANK, *([1, 1] if weight.ndim == 4 else []), generator=gen
    )
    return down, up


def _every_module_lora(parts, seed: int = 0) -> list[LoraModule]:
    """A LoRA on every Linear / Conv2d of ldm's U-Net and both text encoders (scale 1/2)."""
    gen = torch.Generator().manual_seed(seed)
    modules = []
    for part in PARTS:
        for name, module in getattr(parts, part).named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                modules.append(LoraModule(part, name, *_pair(module.weight, gen), alpha=1.0))
    return modules


def _text_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """A CLIP submodule whether or not transformers nests it under text_model (< 5, projection)."""
    return model.get_submodule(("text_model." if hasattr(model, "text_model") else "") + path)


def _diffusers_merged(folder, lora_file) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers loads ``lora_file`` (warning about nothing) and fuses it: its state dicts."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    records: list[logging.LogRecord] = []
    log = logging.Handler(logging.WARNING)
    log.emit = records.append
    diffusers_logging.get_logger("diffusers").addHandler(log)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(lora_file))
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(log)
    said = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    noise = [m for m in said if "lora" in m.lower()]
    assert not noise, noise  # e.g. "unexpected keys", "keys have not been correctly renamed"
    pipe.fuse_lora(components=list(PARTS), lora_scale=1.0)
    pipe.unload_lora_weights()
    return {part: getattr(pipe, part).state_dict() for part in PARTS}


def _assert_same_weights(ours, reference: dict, base) -> int:
    """Every tensor of ldm's parts equals diffusers'; returns how many the LoRA changed."""
    changed = 0
    for part in PARTS:
        mine, theirs = getattr(ours, part).state_dict(), reference[part]
        before = getattr(base, part).state_dict()
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=key)
            changed += not torch.equal(value, before[key])
    return changed


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


# --- (3) diffusers/PEFT SDXL files ------------------------------------------------------------


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


# --- (4) keys that do not apply are reported --------------------------------------------------


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
