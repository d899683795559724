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

SD3's transformer goes by diffusers' names (``transformer.transformer_blocks.0.attn.to_q``) and
by the original MMDiT's (``joint_blocks.0.x_block.attn.qkv``, kohya and ComfyUI): lora_sd3.py.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ldm.errors import CheckpointError, LdmError
from ldm.formats.original_keys import remap, unet_pairs

TEXT_PARTS = ("text_encoder", "text_encoder_2")  # CLIPs (transformers' text_model level)
PARTS = ("unet", *TEXT_PARTS, "text_encoder_3")  # SD3's T5: kohya lora_te3_, ComfyUI t5xxl
TEXT_MODEL = "text_model."  # transformers nests CLIP under it; files keep it, matching ignores it
TEXT_TOP_LEVEL = ("text_projection",)  # CLIPTextModelWithProjection's modules outside text_model

# (file prefix, part, layout); a file's layout is the one most of its pairs use
PREFIXES = (
    ("lora_unet_", "unet", "kohya"),
    ("lora_te1_", "text_encoder", "kohya"),  # SDXL: CLIP ViT-L
    ("lora_te2_", "text_encoder_2", "kohya"),  # SDXL: OpenCLIP bigG
    ("lora_te_", "text_encoder", "kohya"),  # SD 1.x/2.x
    ("lora_te3_", "text_encoder_3", "kohya"),  # SD3: T5-XXL
    ("lycoris_", "unet", "kohya"),  # SimpleTuner's LyCORIS: diffusers paths, underscored
    ("lora_transformer_", "unet", "kohya"),  # OneTrainer SD3: diffusers paths, underscored
    ("unet.", "unet", "diffusers"),
    ("transformer.", "unet", "diffusers"),  # SD3 (diffusers' SD3LoraLoaderMixin)
    ("text_encoder.", "text_encoder", "diffusers"),
    ("text_encoder_2.", "text_encoder_2", "diffusers"),
    ("text_encoder_3.", "text_encoder_3", "diffusers"),  # ldm's own; diffusers reads none
    ("diffusion_model.", "unet", "comfyui"),
    ("text_encoders.clip_l.transformer.", "text_encoder", "comfyui"),
    ("text_encoders.clip_h.transformer.", "text_encoder", "comfyui"),  # SD 2.x's OpenCLIP-H
    ("text_encoders.clip_g.transformer.", "text_encoder_2", "comfyui"),
    ("text_encoders.t5xxl.transformer.", "text_encoder_3", "comfyui"),
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
KOHYA_TEXT_PREFIX = {  # what kohya writes: (SD 1.x/2.x, SDXL and SD3)
    "text_encoder": ("lora_te_", "lora_te1_"),
    "text_encoder_2": ("lora_te2_", "lora_te2_"),
    "text_encoder_3": ("lora_te3_", "lora_te3_"),
}
# the top-level modules of diffusers' SD3Transformer2DModel: its pairs are "transformer." pairs
SD3_TOP_LEVEL = ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks",
                 "norm_out", "proj_out")  # fmt: skip


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


def is_sd3(config) -> bool:
    """SD3's MMDiT (ldm's SD3Config or its config.json) rather than a U-Net or FLUX.1's
    transformer (which also has joint_attention_dim; lora_flux.is_flux: num_single_layers)."""
    if config is None:
        return False
    c = unet_config_dict(config)
    return "joint_attention_dim" in c and "num_single_layers" not in c


def network_prefix(paths: list[str]) -> str:
    """diffusers' file prefix for the latent network's pairs: "transformer" (SD3) or "unet"."""
    return "transformer" if any(p.split(".")[0] in SD3_TOP_LEVEL for p in paths) else "unet"


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


def kohya_name(part: str, path: str, sdxl: bool, renames: dict[str, str] | None = None) -> str:
    """The kohya stem of module ``path`` of ``part``; ``renames``: the network's module names in
    kohya's files (SDXL: sgm paths; SD3: original paths); ``sdxl``: SDXL / SD3 text prefixes."""
    if part == "unet":
        if sdxl or renames is not None:
            if renames is None:
                raise LdmError("LoRA: an SDXL kohya file needs the U-Net config for its names")
            if path not in renames:
                raise LdmError(
                    f"LoRA: network module {path!r} has no original name (cannot write kohya)"
                )
            path = renames[path]
        return "lora_unet_" + path.replace(".", "_")
    if part not in KOHYA_TEXT_PREFIX:
        raise LdmError(f"LoRA: kohya files have no place for a '{part}' module")
    return KOHYA_TEXT_PREFIX[part][sdxl] + _text_path(part, path).replace(".", "_")


def diffusers_name(part: str, path: str) -> str:
    """The diffusers/PEFT stem of module ``path`` of ``part`` (CLIP under ``text_model.``)."""
    if part == "unet":
        return f"{network_prefix([path])}.{path}"
    return f"{part}.{_text_path(part, path)}"


def _text_path(part: str, path: str) -> str:
    """A CLIP module path as transformers names it: all but the projection under text_model."""
    if part not in TEXT_PARTS:
        return path  # T5: no text_model level
    path = path.removeprefix(TEXT_MODEL)
    return path if path.split(".")[0] in TEXT_TOP_LEVEL else TEXT_MODEL + path
