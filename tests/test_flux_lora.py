"""FLUX.1 LoRA files: kohya (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_te1_``,
``lora_te3_``), diffusers/PEFT (``transformer.*.lora_A``) and ComfyUI (``diffusion_model.*``)
load with every key applied; ldm writes kohya and diffusers files -- offline, tiny.

Independent routes: the merged weights are W + (alpha / rank) up @ down computed here per
diffusers module; diffusers' own kohya reader (``FluxLoraLoaderMixin.lora_state_dict``) and PEFT
(``load_lora_adapter`` + ``fuse_lora``) read ldm's kohya files to the same ΔW and weights.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_flux import tiny_flux_dev  # noqa: F401 (fixture)

from ldm.formats.diffusers_folder import load_folder
from ldm.formats.lora import LoraModule, apply_lora, convert_lora, load_lora
from ldm.formats.lora_flux import flux_original_modules, fuse_original, is_flux, save_flux_lora
from ldm.formats.safe_load import read_safetensors_header

DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
          "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
          "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
          "norm1_context.linear")  # fmt: skip
SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")
TOP = ("x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
       "time_text_embed.guidance_embedder.linear_2", "norm_out.linear", "proj_out")  # fmt: skip
CLIP = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.0.mlp.fc2")  # transformers 5 paths
# every CLIP-L Linear of a layer, as kohya trains them (diffusers tells its text keys' spelling
# by an out_proj key: a file without one is read wrong there)
CLIP_LAYER = tuple(f"encoder.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj",
                   "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"))  # fmt: skip
T5 = ("encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.o")


@pytest.fixture(scope="module")
def parts(tiny_flux_dev):  # noqa: F811
    return load_folder(tiny_flux_dev)


def _names(blocks: bool = True, single_fused: bool = True, top: bool = True) -> list:
    names = [("unet", f"transformer_blocks.0.{n}") for n in DOUBLE] if blocks else []
    names += [("unet", f"single_transformer_blocks.0.{n}") for n in SINGLE
              if single_fused or n in ("proj_out", "norm.linear")]  # fmt: skip
    names += [("unet", n) for n in TOP] if top else []
    return names


def _pairs(model_of, names, seed: int = 0, ranks=(2, 3)) -> list[LoraModule]:
    """Random pairs with mixed ranks and alphas (alpha None = rank) on the given modules."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (part, path) in enumerate(names):
        weight = model_of(part).get_submodule(path).weight
        rank = ranks[i % len(ranks)]
        alpha = (None, 1.0, 4.0)[i % 3]
        down = torch.randn(rank, weight.shape[1], generator=g) * 0.1
        up = torch.randn(weight.shape[0], rank, generator=g) * 0.1
        out.append(LoraModule(part, path, down, up, alpha))
    return out


def _expected(parts, modules: list) -> dict:
    """Every touched weight after W += (alpha / rank) up @ down, computed here per module."""
    out = {}
    for m in modules:
        part = {"text_encoder_3": "text_encoder_2"}.get(m.part, m.part)
        key = (part, m.name)
        w = out.get(key, getattr(parts, part).get_submodule(m.name).weight.detach().clone())
        out[key] = w + m.scale * m.up @ m.down
    return out


def _check_merged(merged, expected: dict) -> None:
    for (part, path), w in expected.items():
        got = getattr(merged, part).get_submodule(path).weight
        torch.testing.assert_close(got, w, rtol=0, atol=2e-6, msg=f"{part}.{path}")


def _merge(parts, path):
    merged = copy.deepcopy(parts)
    report = apply_lora(merged, path)
    assert report.warning() is None, report.warning()
    return merged, report


def _all_modules(with_text: bool = True) -> list:
    names = _names()
    if with_text:
        names += [("text_encoder", n) for n in CLIP] + [("text_encoder_2", n) for n in T5]
    return names


def test_kohya_file_names_and_metadata(parts, tmp_path):
    modules = _pairs(lambda p: getattr(parts, p), _all_modules())
    path = save_flux_lora(modules, tmp_path / "k.safetensors", parts.unet.config, "kohya")
    keys = set(load_file(path))
    for stem in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
                 "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_modulation_lin",
                 "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_guidance_in_out_layer",
                 "lora_unet_img_in", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te3_encoder_block_0_layer_0_SelfAttention_q"):  # fmt: skip
        assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= keys
    assert not any("to_q" in k or "transformer_blocks" in k for k in keys)
    meta = read_safetensors_header(path)["__metadata__"]
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert is_flux(parts.unet.config) and len(flux_original_modules(parts.unet.config)) == 23


def _comfyui(kohya: dict, fused: list, peft: bool) -> dict:
    """A ComfyUI-named copy of ldm's kohya file: BFL / transformers paths with dots."""
    prefixes = {"unet": "diffusion_model.",
                "text_encoder": "text_encoders.clip_l.transformer.text_model.",
                "text_encoder_2": "text_encoders.t5xxl.transformer."}  # fmt: skip
    out = {}
    for m in fused:
        stem = f"{prefixes[m.part]}{m.name}"
        kohya_stem = next(k for k in kohya if k.endswith(".alpha") and
                          k[:-6].endswith(m.name.replace(".", "_")))[:-6]  # fmt: skip
        down, up = kohya[f"{kohya_stem}.lora_down.weight"], kohya[f"{kohya_stem}.lora_up.weight"]
        if peft:  # lora_A / lora_B, no alpha key: alpha / rank folded into B
            out[f"{stem}.lora_A.weight"] = down
            out[f"{stem}.lora_B.weight"] = up * (kohya[f"{kohya_stem}.alpha"] / down.shape[0])
        else:
            out |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                    f"{stem}.alpha": kohya[f"{kohya_stem}.alpha"]}  # fmt: skip
    return out


def _onetrainer(diffusers: dict) -> dict:
    """OneTrainer's FLUX names: diffusers paths underscored under lora_transformer_ / lora_te1_."""
    out = {}
    for key, t in diffusers.items():
        stem, kind = key.rsplit(".lora_", 1)
        part, path = stem.split(".", 1)
        prefix = {"transformer": "lora_transformer_", "text_encoder": "lora_te1_"}.get(part)
        if prefix is None:
            continue  # T5: OneTrainer trains none for FLUX
        name = prefix + path.replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = t
    return out


@pytest.mark.parametrize("layout", ["kohya", "diffusers", "comfyui", "comfyui-peft", "onetrainer"])
def test_every_layout_applies_every_key(parts, tmp_path, layout):
    with_t5 = layout != "onetrainer"
    modules = _pairs(lambda p: getattr(parts, p), _all_modules(), seed=1)
    modules = [m for m in modules if with_t5 or m.part != "text_encoder_2"]
    path = tmp_path / f"{layout}.safetensors"
    written = "kohya" if layout.startswith(("kohya", "comfyui")) else "diffusers"
    save_flux_lora(modules, path, parts.unet.config, written)
    if layout.startswith("comfyui"):
        fused = fuse_original(modules, parts.unet.config)
        save_file(_comfyui(load_file(path), fused, layout.endswith("peft")), path)
    if layout == "onetrainer":
        save_file(_onetrainer(load_file(path)), path)
    lora = load_lora(path)
    assert not lora.unknown
    merged, report = _merge(parts, path)
    touched = {f"{'text_encoder_2' if m.part == 'text_encoder_3' else m.part}.{m.name}"
               for m in modules}  # fmt: skip
    assert {m.replace("text_encoder_3.", "text_encoder_2.") for m in report.matched} == touched
    _check_merged(merged, _expected(parts, modules))


def test_unknown_keys_are_reported(parts, tmp_path):
    modules = _pairs(lambda p: getattr(parts, p), _names(single_fused=False, top=False))
    path = save_flux_lora(modules, tmp_path / "k.safetensors", parts.unet.config, "kohya")
    state = load_file(path)
    state["lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight"] = torch.zeros(2, 32)
    state["lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight"] = torch.zeros(96, 2)
    state["lora_unet_single_blocks_0_linear1.lora_up.weight"] = torch.zeros(5, 2)  # wrong rows
    state["lora_unet_single_blocks_0_linear1.lora_down.weight"] = torch.zeros(2, 32)
    save_file(state, path)
    report = apply_lora(copy.deepcopy(parts), path)
    assert report.unmatched == [
        "lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight",
        "lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight",
    ]
    assert len(report.mismatched) == 1 and "linear1" in report.mismatched[0]


def test_converting_between_layouts_keeps_the_weights(parts, tmp_path):
    modules = _pairs(lambda p: getattr(parts, p), _all_modules(), seed=2)
    kohya = save_flux_lora(modules, tmp_path / "k.safetensors", parts.unet.config, "kohya")
    convert_lora(parts, kohya, tmp_path / "d.safetensors", "diffusers")
    convert_lora(parts, tmp_path / "d.safetensors", tmp_path / "k2.safetensors", "kohya")
    expected = _expected(parts, modules)
    for name in ("d", "k2"):
        _check_merged(_merge(parts, tmp_path / f"{name}.safetensors")[0], expected)
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight" in load_file(
        tmp_path / "d.safetensors"
    )


def _delta(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return b.float() @ (a.float() @ x)  # ΔW x without forming ΔW


def test_diffusers_reads_our_kohya_file_at_flux_width(tmp_path):
    """FLUX.1's own widths (3072, MLP 12288; diffusers' reader hard-codes them), one block each.

    diffusers 0.42 names the in/out layers' pairs without "transformer." (``x_embedder``,
    ``norm_out.linear``), which its FluxPipeline then skips; their ΔW is checked all the same
    (the final adaLN's swap is diffusers' own ``swap_scale_shift``)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import FluxLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        net = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
        clip = CLIPTextModel(CLIPTextConfig(num_hidden_layers=1))
    names = _names() + [("text_encoder", n) for n in CLIP_LAYER]
    modules = _pairs(lambda p: net if p == "unet" else clip, names, seed=3, ranks=(4, 2))
    # to_k untrained (its rows of the fused qkv stay zero), and a single block's MLP input
    # untrained, as a trainer that targets to_q / to_k / to_v leaves linear1's last rows
    untrained = ("transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_mlp")
    modules = [m for m in modules if m.name not in untrained]
    path = save_flux_lora(modules, tmp_path / "k.safetensors", {**net.config}, "kohya")
    read = FluxLoraLoaderMixin.lora_state_dict(str(path))
    text = {k.removeprefix("text_encoder."): v for k, v in read.items() if k.startswith("text_")}
    # diffusers' text-encoder loader turns its processor spellings into PEFT names so
    text = convert_state_dict_to_peft(convert_state_dict_to_diffusers(text))
    read |= {f"text_encoder.{k.removeprefix('text_model.')}": v for k, v in text.items()}
    read = {k if k.startswith(("transformer.", "text_")) else f"transformer.{k}": v
            for k, v in read.items() if not k.startswith("text_encoder.text_model.")}  # fmt: skip
    owned = {f"transformer.{n}" for n, _ in net.named_modules()}
    owned |= {f"text_encoder.{n}" for n, _ in clip.named_modules()}
    stems = {k.rsplit(".lora", 1)[0] for k in read}
    assert stems <= owned, sorted(stems - owned)[:3]  # every key names a module diffusers has
    assert len(stems) == len(modules) + 2  # + the untrained two, whose rows read back as zero
    x = torch.randn(15360, 3, generator=torch.Generator().manual_seed(0))
    for m in modules:
        stem = f"transformer.{m.name}" if m.part == "unet" else f"text_encoder.{m.name}"
        a, b = read[f"{stem}.lora_A.weight"], read[f"{stem}.lora_B.weight"]
        xs = x[: m.down.shape[1]]
        torch.testing.assert_close(_delta(a, b, xs), m.scale * _delta(m.down, m.up, xs),
                                   rtol=1e-5, atol=1e-6, msg=stem)  # fmt: skip
    for stem in untrained:
        assert not read[f"transformer.{stem}.lora_B.weight"].any()  # untrained: zero


def test_diffusers_peft_merges_our_kohya_file_to_our_weights(parts, tiny_flux_dev, tmp_path):  # noqa: F811
    """diffusers' kohya reader + PEFT fuse the same weights ldm merges (its reader splits a
    single block's linear1 at FLUX.1's 3072 width, so the tiny model's is left out here)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import FluxLoraLoaderMixin

    modules = _pairs(lambda p: getattr(parts, p), _names(single_fused=False, top=False), seed=4)
    del modules[4]  # add_k_proj untrained
    path = save_flux_lora(modules, tmp_path / "k.safetensors", parts.unet.config, "kohya")
    theirs = FluxTransformer2DModel.from_pretrained(tiny_flux_dev / "transformer")
    state = FluxLoraLoaderMixin.lora_state_dict(str(path))
    assert all(k.startswith("transformer.") for k in state)
    theirs.load_lora_adapter(state, prefix="transformer", adapter_name="k")
    layers = {n.removesuffix(".base_layer") for n, _ in theirs.named_modules()
              if n.endswith(".base_layer")}  # fmt: skip
    assert layers == {m.name for m in modules} | {"transformer_blocks.0.attn.add_k_proj"}
    theirs.fuse_lora(lora_scale=1.0)
    theirs.unload_lora()
    merged, _ = _merge(parts, path)
    ours = merged.unet.state_dict()
    for name, w in theirs.state_dict().items():
        torch.testing.assert_close(ours[name], w, rtol=0, atol=2e-6, msg=name)


def test_diffusers_form_is_what_diffusers_writes(parts, tmp_path):
    modules = _pairs(lambda p: getattr(parts, p), _all_modules(), seed=5)
    path = save_flux_lora(modules, tmp_path / "d.safetensors", parts.unet.config, "diffusers")
    keys = load_file(path)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" in keys
    note = json.loads(read_safetensors_header(path)["__metadata__"]["ldm_lora"])
    assert note["alpha_folded_into_lora_B"]


@pytest.mark.skipif(not os.environ.get("LDM_SD_SCRIPTS"), reason="LDM_SD_SCRIPTS: sd-scripts")
def test_kohya_sd_scripts_makes_and_loads_exactly_our_flux_names(tmp_path):
    """sd-scripts' FLUX LoRANetwork (every module it trains, in_dims set) on its own FLUX.1-dev
    (meta device) names exactly the modules ldm writes (kohya has no final-layer pairs), and
    its loader takes every key of ldm's file."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.models.build import build_network

    sys.path.insert(0, os.environ["LDM_SD_SCRIPTS"])
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))  # image I/O only, not the LoRA path
    from library import flux_models
    from networks import lora_flux as kohya

    config = {"num_layers": 19, "num_single_layers": 38, "guidance_embeds": True}
    with torch.device("meta"):
        flux = flux_models.Flux(flux_models.configs["dev"].params)
        te = CLIPTextModel(CLIPTextConfig())
        ours = build_network(config, family="flux")
    network = kohya.create_network(1.0, 1, 1.0, None, [te, None], flux, in_dims="[1,1,1,1,1]")
    # transformers >= 5 has no text_model level; kohya files made on 4.x (and ldm's) keep it
    theirs = {m.lora_name.replace("lora_te1_", "lora_te1_text_model_")
              for m in network.text_encoder_loras + network.unet_loras}  # fmt: skip
    modules = []
    for part, model in (("unet", ours), ("text_encoder", te)):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.startswith(("norm_out", "proj_o")):
                w = module.weight
                modules.append(LoraModule(part, name, torch.zeros(1, w.shape[1]),
                                          torch.zeros(w.shape[0], 1), 1.0))  # fmt: skip
    path = save_flux_lora(modules, tmp_path / "flux.safetensors", ours.config, "kohya")
    state = load_file(path)
    assert {k.split(".")[0] for k in state} == theirs
    assert len(theirs) == 19 * 10 + 38 * 3 + 8 + 72  # blocks, in layers, CLIP-L (12 x 6)
    state = {k.replace("lora_te1_text_model_", "lora_te1_"): v for k, v in state.items()}
    loaded, _ = kohya.create_network_from_weights(
        1.0, None, None, [te, None], flux, weights_sd=dict(state), for_inference=True
    )
    loaded.apply_to([te, None], flux, True, True)
    result = loaded.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys


def test_diffusers_pipeline_with_our_kohya_lora_draws_our_image(parts, tiny_flux_dev, tmp_path):  # noqa: F811
    """The issue's proof: a kohya FLUX LoRA made by ldm (transformer blocks and CLIP-L) loads in
    diffusers' FluxPipeline with no unmatched keys and draws ldm's image (within 2/255)."""
    import numpy as np
    from diffusers import FluxPipeline

    from ldm.pipeline import Pipeline

    names = _names(single_fused=False, top=False) + [("text_encoder", n) for n in CLIP_LAYER]
    modules = _pairs(lambda p: getattr(parts, p), names, seed=6)
    for m in modules:
        m.up = m.up * 20  # a LoRA strong enough to move the tiny model's image
    path = save_flux_lora(modules, tmp_path / "k.safetensors", parts.unet.config, "kohya")
    settings = dict(height=32, width=32, guidance_scale=3.5)
    merged, _ = _merge(parts, path)
    pipe = Pipeline(merged, torch.device("cpu"), torch.float32)
    (out,) = pipe(["a red circle"], [1], steps=3, **settings)
    ours = np.asarray(out.image, dtype=np.int16)
    pipe = FluxPipeline.from_pretrained(tiny_flux_dev)
    pipe.set_progress_bar_config(disable=True)

    def theirs() -> np.ndarray:
        image = pipe("a red circle", num_inference_steps=3, **settings,
                     generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip
        return np.asarray(image, dtype=np.int16)

    base = theirs()
    pipe.load_lora_weights(str(path))
    injected = {n.removesuffix(".base_layer") for c in (pipe.transformer, pipe.text_encoder)
                for n, _ in c.named_modules() if n.endswith(".base_layer")}  # fmt: skip
    assert len(injected) == len(modules)  # every pair of the file found its module
    image = theirs()
    assert np.abs(image - base).max() > 10  # the LoRA changed diffusers' image
    assert np.abs(image - ours).max() <= 2, np.abs(image - ours).max()
