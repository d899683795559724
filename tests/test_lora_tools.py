"""ldm's LoRA files in the other tools' own loaders: kohya sd-scripts and ComfyUI (opt-in).

Skipped unless LDM_SD_SCRIPTS / LDM_COMFYUI name a checkout of kohya-ss/sd-scripts / ComfyUI
(neither is a dependency). kohya: its LoRANetwork on the real SDXL shapes (meta device) names the
modules it trains; ldm's kohya file must use exactly those names, and kohya's
create_network_from_weights + load_state_dict must take every key. ComfyUI: its key maps
(comfy/lora.py model_lora_keys_unet / _clip) and load_lora on tiny SD 1.x and SDXL models; the
weights its patches produce must equal ldm's merged weights. The results are in docs/lora.md.
"""

from __future__ import annotations

import logging
import os
import sys
import types

import pytest
import torch

from ldm.formats.diffusers_folder import load_folder
from ldm.formats.lora import LoraModule, apply_lora, save_diffusers_lora, save_kohya_lora
from ldm.formats.original_keys import remap, unet_pairs
from ldm.formats.safe_load import load_state_dict

SD_SCRIPTS = os.environ.get("LDM_SD_SCRIPTS")
COMFYUI = os.environ.get("LDM_COMFYUI")


def _zero_lora(models: dict[str, torch.nn.Module], rank: int = 1, seed=None) -> list:
    """A pair on every Linear / Conv2d of each part (random when ``seed`` is given)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    modules = []
    for part, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                w = module.weight
                shape_up = (w.shape[0], rank, *([1, 1] if w.ndim == 4 else []))
                if gen is None:
                    down, up = torch.zeros(rank, *w.shape[1:]), torch.zeros(shape_up)
                else:
                    down = torch.randn(rank, *w.shape[1:], generator=gen)
                    up = 0.1 * torch.randn(shape_up, generator=gen)
                modules.append(LoraModule(part, name, down, up, alpha=float(rank)))
    return modules


# --- kohya sd-scripts --------------------------------------------------------------------------


@pytest.mark.skipif(not SD_SCRIPTS, reason="LDM_SD_SCRIPTS: a kohya-ss/sd-scripts checkout")
def test_kohya_trains_and_loads_exactly_our_sdxl_names(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm.models.families import FAMILIES
    from ldm.models.unet import UNet2DConditionModel, UNetConfig

    sys.path.insert(0, SD_SCRIPTS)
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))  # image I/O only, not the LoRA path
    from library.sdxl_original_unet import SdxlUNet2DConditionModel
    from networks import lora as kohya

    configs = FAMILIES["sdxl"].single_file  # the public SDXL 1.0 configs
    clip = {k: CLIPTextConfig(**{n: v for n, v in configs[k].items() if n != "architectures"})
            for k in ("text_encoder", "text_encoder_2")}  # fmt: skip
    with torch.device("meta"):
        kohya_unet = SdxlUNet2DConditionModel()
        te1, te2 = (
            CLIPTextModel(clip["text_encoder"]),
            CLIPTextModelWithProjection(clip["text_encoder_2"]),
        )
        unet = UNet2DConditionModel(UNetConfig.from_diffusers(configs["unet"]))

    class Nested(torch.nn.Module):  # transformers 4.x (sd-scripts pins it) nests CLIP one level
        def __init__(self, model):
            super().__init__()
            self.text_model = model

    te1 = te1 if hasattr(te1, "text_model") else Nested(te1)
    # conv_dim: LoCon, every Linear/Conv2d of the blocks kohya's LoRA can reach
    network = kohya.create_network(
        1.0, 1, 1.0, None, [te1, te2], kohya_unet, conv_dim=1, conv_alpha=1
    )
    theirs = {m.lora_name for m in network.text_encoder_loras + network.unet_loras}

    ours_modules = _zero_lora({"unet": unet, "text_encoder": te1, "text_encoder_2": te2})
    path = save_kohya_lora(ours_modules, tmp_path / "sdxl.safetensors", unet_config=unet.config)
    state = load_state_dict(path)
    ours = {k.split(".")[0] for k in state}
    # modules outside kohya's target blocks (it never trains them; ComfyUI and diffusers load them)
    extra = {"lora_unet_input_blocks_0_0", "lora_unet_out_2", "lora_unet_time_embed_0",
             "lora_unet_time_embed_2", "lora_unet_label_emb_0_0", "lora_unet_label_emb_0_2",
             "lora_te2_text_projection"}  # fmt: skip
    assert ours - theirs == extra and theirs <= ours
    state = {k: v for k, v in state.items() if k.split(".")[0] in theirs}
    loaded, _ = kohya.create_network_from_weights(
        1.0, None, None, [te1, te2], kohya_unet, weights_sd=dict(state), for_inference=True
    )
    loaded.apply_to([te1, te2], kohya_unet, True, True)
    result = loaded.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert len(loaded.text_encoder_loras) + len(loaded.unet_loras) == len(theirs) == 1052


# --- ComfyUI -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comfy():
    if not COMFYUI:
        pytest.skip("LDM_COMFYUI: a ComfyUI checkout")
    sys.path.insert(0, COMFYUI)
    # ComfyUI's device manager, model classes and argv flags are not on the key-mapping path
    management = types.ModuleType("comfy.model_management")
    management.cast_to_device = lambda t, device, dtype, copy=False: t.to(device, dtype, copy=copy)
    model_base = types.ModuleType("comfy.model_base")
    model_base.__getattr__ = _model_class
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(mmap_torch_files=False, disable_mmap=True)
    for name, module in (("comfy.model_management", management), ("comfy.model_base", model_base),
                         ("comfy.cli_args", cli_args)):  # fmt: skip
        sys.modules.setdefault(name, module)
    import comfy

    for name in ("model_management", "model_base", "cli_args"):
        setattr(comfy, name, sys.modules[f"comfy.{name}"])
    import comfy.lora
    import comfy.lora_convert

    return comfy


def _model_class(name: str) -> type:
    """comfy.model_base stand-in: any model class ComfyUI tests with isinstance (none match)."""
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {})


def _comfy_unet_config(config: dict) -> dict:
    """The fields of ComfyUI's detected unet_config that unet_to_diffusers reads."""
    n, lpb = len(config["block_out_channels"]), config["layers_per_block"]
    depth = config.get("transformer_layers_per_block", 1)
    depth = list(depth) if isinstance(depth, list | tuple) else [depth] * n
    level = [
        d if t.startswith("CrossAttn") else 0 for d, t in zip(depth, config["down_block_types"])
    ]
    return dict(num_res_blocks=[lpb] * n, channel_mult=[1] * n, transformer_depth_middle=depth[-1],
                transformer_depth=[d for d in level for _ in range(lpb)],
                transformer_depth_output=[d for d in level for _ in range(lpb + 1)])  # fmt: skip


def _comfy_apply(comfy, parts, path, clip_names):
    """ComfyUI's LoraLoader path on ldm's weights: (merged state in ldm names, keys not loaded)."""
    config = parts.unet.config.to_diffusers()
    sgm = remap(parts.unet.state_dict(), unet_pairs(config), True, "unet")
    unet_sd = {"diffusion_model." + k: v for k, v in sgm.items()}
    clip_sd = {}
    for part, prefix in clip_names.items():
        for k, v in getattr(parts, part).state_dict().items():
            name = k if k.startswith(("text_model.", "text_projection")) else "text_model." + k
            clip_sd[f"{prefix}.transformer.{name}"] = (part, k, v)
    comfy_config = types.SimpleNamespace(unet_config=_comfy_unet_config(config))
    model = types.SimpleNamespace(state_dict=lambda: unet_sd, model_config=comfy_config)
    clip = types.SimpleNamespace(state_dict=lambda: clip_sd)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip, key_map)
    lora = comfy.lora_convert.convert_lora(dict(load_state_dict(path)))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        patches = comfy.lora.load_lora(lora, key_map)
    finally:
        logging.getLogger().removeHandler(handler)
    not_loaded = sorted(
        r.getMessage().split(": ", 1)[1] for r in records if "not loaded" in r.getMessage()
    )
    merged = {}
    for key, patch in patches.items():
        weight = unet_sd[key] if key in unet_sd else clip_sd[key][2]
        new = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], weight.clone(), key)
        merged[key] = new
    back = {}  # ComfyUI's weight names -> ldm's
    unet_back = remap({k[len("diffusion_model.") :]: v for k, v in merged.items() if k in unet_sd},
                      unet_pairs(config), False, "unet")  # fmt: skip
    back |= {("unet", k): v for k, v in unet_back.items()}
    back |= {clip_sd[k][:2]: v for k, v in merged.items() if k in clip_sd}
    return back, not_loaded


@pytest.mark.parametrize("family", ["sdxl", "sd1", "sd2"])
def test_comfyui_loads_our_files(comfy, family, request, tmp_path):
    folder = request.getfixturevalue(f"tiny_{family}")
    parts = load_folder(folder)
    texts = ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)
    clip_names = dict(zip(texts, ("clip_h",) if family == "sd2" else ("clip_l", "clip_g")))
    modules = _zero_lora({p: getattr(parts, p) for p in ("unet", *texts)}, rank=2, seed=0)
    kohya = save_kohya_lora(modules, tmp_path / "k.safetensors", unet_config=parts.unet.config)
    peft = save_diffusers_lora(modules, tmp_path / "d.safetensors")
    for path, layout in ((kohya, "kohya"), (peft, "diffusers")):
        merged, not_loaded = _comfy_apply(comfy, parts, path, clip_names)
        ours = load_folder(folder)
        assert apply_lora(ours, path).warning() is None
        for (part, key), value in merged.items():
            torch.testing.assert_close(value, getattr(ours, part).state_dict()[key], rtol=1e-5,
                                       atol=1e-6, msg=f"{layout} {key}")  # fmt: skip
        if layout == "kohya":
            assert not not_loaded and len(merged) == len(modules)
            continue
        # diffusers/PEFT: ComfyUI maps U-Net attention only as "unet.<...>.processor.to_q" (the
        # old attention-processor spelling), and not bigG's text_projection: those stay out
        skipped = {k.rsplit(".", 2)[0] for k in not_loaded}
        expected = {f"unet.{m.name}" for m in modules if m.part == "unet"
                    and m.name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")
                    and ".attn" in m.name}  # fmt: skip
        expected |= {"text_encoder_2.text_projection"} if family == "sdxl" else set()
        assert skipped == expected
        assert len(merged) == len(modules) - len(expected)
