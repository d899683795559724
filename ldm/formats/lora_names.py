"""Which module of ldm's model a LoRA file key names: prefixes, suffixes and sgm U-Net names.

Files in use name a module three ways. kohya (``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` /
``lora_te2_``, dots turned into underscores): SD 1.x/2.x files use diffusers U-Net paths, SDXL
files the original sgm paths (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``), because kohya
trains SDXL on its own sgm U-Net (sd-scripts networks/lora.py, library/sdxl_original_unet.py).
diffusers/PEFT (``unet.`` / ``text_encoder.`` / ``text_encoder_2.``, dotted diffusers paths).
ComfyUI's own files (``diffusion_model.`` + dotted sgm path, ``text_encoders.clip_l.transformer.``;
comfy/lora.py ``model_lora_keys_unet`` / ``model_lora_keys_clip``). Every name is compared in
underscore space, and the U-Net index holds each module under both its diffusers and its sgm
name, so one lookup serves every layout. The sgm names come from ``original_keys.unet_pairs``,
the table the single-file loader uses, so LoRA and checkpoint names cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ldm.errors import CheckpointError, LdmError
from ldm.formats.original_keys import remap, unet_pairs

TEXT_PARTS = ("text_encoder", "text_encoder_2")
PARTS = ("unet", *TEXT_PARTS)
TEXT_MODEL = "text_model."  # transformers nests CLIP under it; files keep it, matching ignores it
TEXT_TOP_LEVEL = ("text_projection",)  # CLIPTextModelWithProjection's modules outside text_model

# (file prefix, part, layout); a file's layout is the one most of its pairs use
PREFIXES = (
    ("lora_unet_", "unet", "kohya"),
    ("lora_te1_", "text_encoder", "kohya"),  # SDXL: CLIP ViT-L
    ("lora_te2_", "text_encoder_2", "kohya"),  # SDXL: OpenCLIP bigG
    ("lora_te_", "text_encoder", "kohya"),  # SD 1.x/2.x
    ("lycoris_", "unet", "kohya"),  # SimpleTuner's LyCORIS: diffusers paths, underscored
    ("unet.", "unet", "diffusers"),
    ("text_encoder.", "text_encoder", "diffusers"),
    ("text_encoder_2.", "text_encoder_2", "diffusers"),
    ("diffusion_model.", "unet", "comfyui"),
    ("text_encoders.clip_l.transformer.", "text_encoder", "comfyui"),
    ("text_encoders.clip_h.transformer.", "text_encoder", "comfyui"),  # SD 2.x's OpenCLIP-H
    ("text_encoders.clip_g.transformer.", "text_encoder_2", "comfyui"),
)
# (down suffix, up suffix): kohya/ComfyUI, PEFT, older diffusers spellings, diffusers' attention
# processors (``attn1.processor.to_q_lora.down.weight``)
SUFFIXES = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
)
KOHYA_TEXT_PREFIX = {  # what kohya writes: (SD 1.x/2.x, SDXL)
    "text_encoder": ("lora_te_", "lora_te1_"),
    "text_encoder_2": ("lora_te2_", "lora_te2_"),
}


def split_key(key: str) -> tuple[str, str, str, str, str] | None:
    """``key`` -> (part, module name, layout, up key, stem) for a LoRA down weight, else None."""
    for down, up in SUFFIXES:
        if not key.endswith(down):
            continue
        stem = key[: -len(down)]
        for prefix, part, layout in PREFIXES:
            if stem.startswith(prefix):
                return part, stem[len(prefix) :], layout, stem + up, stem
    return None


def flat(name: str) -> str:
    """A module name in any layout -> underscore space (peft wrappers, processors, text_model off).

    diffusers' attention-processor spelling names ``attn1.processor.to_out_lora`` for the module
    ``attn1.to_out.0`` (and ``self_attn.to_q_lora`` for CLIP's ``q_proj``); PEFT wraps a module
    as ``<path>.base_layer``.
    """
    name = name.replace(".base_layer", "").replace(".", "_").removeprefix("text_model_")
    name = name.replace("_processor_to_", "_to_")
    name = re.sub(r"self_attn_to_(q|k|v|out)$", r"self_attn_\1_proj", name)  # CLIP, same era
    return name + "_0" if name.endswith("_to_out") else name


def unet_config_dict(config) -> dict:
    """ldm's UNetConfig or a diffusers ``config.json`` dict -> the dict ``unet_pairs`` reads."""
    if dataclasses.is_dataclass(config):
        return config.to_diffusers()
    return dict(config)


def is_sdxl(config) -> bool:
    """SDXL base and refiner U-Nets take text_time conditioning; kohya names them in sgm."""
    return unet_config_dict(config).get("addition_embed_type") == "text_time"


def sgm_names(config, paths: list[str]) -> dict[str, str]:
    """Dotted diffusers module paths -> dotted sgm paths (those with no counterpart left out)."""
    pairs = unet_pairs(unet_config_dict(config))
    out = {}
    for path in paths:
        try:
            (key,) = remap({path + ".weight": None}, pairs, True, "unet")
        except CheckpointError:
            continue  # e.g. a module unet_pairs does not cover yet: reachable by diffusers name
        out[path] = key.removesuffix(".weight")
    return out


def module_index(model: torch.nn.Module, config=None) -> dict[str, tuple[str, torch.nn.Module]]:
    """Linear and Conv2d modules by underscore name -> (dotted path, module).

    With a U-Net ``config`` every module is also listed under its sgm name.
    """
    index = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and ".lora_" not in name:
            path = name.replace(".base_layer", "")
            index[flat(path)] = (path, module)
    if config is not None:
        paths = [path for path, _ in index.values()]
        for path, sgm in sgm_names(config, paths).items():
            index.setdefault(flat(sgm), index[flat(path)])
    return index


def kohya_name(part: str, path: str, sdxl: bool, sgm: dict[str, str] | None = None) -> str:
    """The kohya stem of module ``path`` of ``part``; ``sgm``: the U-Net's sgm names (SDXL)."""
    if part == "unet":
        if sdxl:
            if sgm is None:
                raise LdmError("LoRA: an SDXL kohya file needs the U-Net config for its names")
            if path not in sgm:
                raise LdmError(f"LoRA: U-Net module {path!r} has no sgm name (cannot write kohya)")
            path = sgm[path]
        return "lora_unet_" + path.replace(".", "_")
    if part not in KOHYA_TEXT_PREFIX:
        raise LdmError(f"LoRA: kohya files have no place for a '{part}' module")
    return KOHYA_TEXT_PREFIX[part][sdxl] + _text_path(path).replace(".", "_")


def diffusers_name(part: str, path: str) -> str:
    """The diffusers/PEFT stem of module ``path`` of ``part`` (CLIP under ``text_model.``)."""
    return f"{part}.{_text_path(path) if part in TEXT_PARTS else path}"


def _text_path(path: str) -> str:
    """A CLIP module path as transformers names it: all but the projection under text_model."""
    path = path.removeprefix(TEXT_MODEL)
    return path if path.split(".")[0] in TEXT_TOP_LEVEL else TEXT_MODEL + path
