"""Text towers of original single files <-> transformers' CLIP names.

OpenAI CLIP is stored in transformers' own layout under a prefix (SD 1.x
``cond_stage_model.transformer.``, SDXL's first encoder ``conditioner.embedders.0.transformer.``).
OpenCLIP is open_clip's ``TextTransformer`` (SD 2.x ``cond_stage_model.model.``, SDXL's bigG
``conditioner.embedders.1.model.``, the refiner's only encoder ``conditioner.embedders.0.model.``):
``nn.MultiheadAttention`` with q/k/v fused into ``in_proj``, ``ln_1``/``ln_2``,
``mlp.c_fc``/``c_proj``, ``positional_embedding``, ``ln_final``, and ``text_projection`` as a
(width, proj) matrix applied as ``x @ P`` -- the transpose of a Linear's weight (open_clip
``TextTransformer.forward``; diffusers' ``convert_open_clip_checkpoint`` transposes it too).
"""

from __future__ import annotations

import math
import re

import torch

from ldm.errors import CheckpointError
from ldm.models import families
from ldm.models.families import TextEncoderSpec

# where each family's text encoders live in an original file, in the family's encoder order
PREFIXES = {
    "sd1": (families.CLIP_PREFIX,),
    "sd2": (families.OPENCLIP_PREFIX,),
    "sdxl": (families.SDXL_CLIP_PREFIX, families.SDXL_OPENCLIP_PREFIX),
    "sdxl-refiner": (families.REFINER_OPENCLIP_PREFIX,),
}
CLIP_LAYER = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
              ("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
              ("mlp.fc2", "mlp.c_proj")]  # fmt: skip
# CLIP's learned temperature, clamped at 100 in training (Radford et al. 2021, sec. 2.5): the
# value the public SDXL files hold (in fp16). No text encoder uses it; written for the layout.
LOGIT_SCALE = math.log(100.0)


def text_towers(family: str) -> list[tuple[TextEncoderSpec, str, str]]:
    """(spec, original key prefix, transformers architecture) per text encoder of ``family``."""
    fam = families.get(family)
    out = []
    for spec, prefix in zip(fam.text_encoders, PREFIXES[family]):
        config = fam.single_file.get(spec.subfolder, {})
        out.append((spec, prefix, config.get("architectures", ["CLIPTextModel"])[0]))
    return out


def _bare(state: dict) -> dict:
    """transformers < 5 prefixes CLIPTextModel's keys with ``text_model.``; >= 5 may not."""
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def clip_to_original(text_state: dict, prefix: str, position_ids: int = 0) -> dict:
    """CLIPTextModel -> ``{prefix}text_model.*``; ``position_ids``: also write that buffer
    (``arange`` of that many positions), which the public SDXL files hold (older transformers
    saved it; nothing reads it)."""
    out = {f"{prefix}text_model.{k}": v for k, v in _bare(text_state).items()}
    if position_ids:
        out[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(position_ids)[None]
    return out


def clip_from_original(state_dict: dict, prefix: str) -> dict:
    """``{prefix}text_model.*`` -> bare CLIPTextModel names (the position_ids buffer dropped)."""
    sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return {k: v for k, v in _bare(sub).items() if not k.endswith("position_ids")}


def openclip_to_original(text_state: dict, prefix: str, logit_scale: bool = False) -> dict:
    """CLIPTextModel(WithProjection) -> open_clip's text tower under ``prefix``."""
    sd = _bare(text_state)
    out = {
        prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in sd:  # Linear (proj, width) -> open_clip's (width, proj)
        out[prefix + "text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    if logit_scale:
        out[prefix + "logit_scale"] = torch.tensor(LOGIT_SCALE)
    sd.pop("embeddings.position_ids", None)
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):  # q, k, v stacked into one in_proj (nn.MultiheadAttention)
            qkv = [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
        for key in [k for k in sd if k.startswith(src)]:
            rest = key[len(src) :]
            for new, old in CLIP_LAYER:
                rest = rest.replace(new + ".", old + ".") if rest.startswith(new + ".") else rest
            out[dst + rest] = sd.pop(key)
    if sd:
        raise CheckpointError(f"text encoder: weights with no OpenCLIP counterpart: {list(sd)[:3]}")
    return out


def openclip_blocks(state_dict: dict, prefix: str) -> int:
    """How many residual blocks an OpenCLIP tower under ``prefix`` holds."""
    pattern = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    return len({m.group(1) for k in state_dict if (m := pattern.match(k))})


def openclip_from_original(
    state_dict: dict, num_layers: int, prefix: str, projection: bool = False
) -> dict:
    """open_clip's text tower -> CLIPTextModel names, keeping the first ``num_layers`` blocks;
    ``projection``: also ``text_projection.weight`` (CLIPTextModelWithProjection)."""
    sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    out = {
        "embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "embeddings.position_embedding.weight": sd["positional_embedding"],
        "final_layer_norm.weight": sd["ln_final.weight"],
        "final_layer_norm.bias": sd["ln_final.bias"],
    }
    if projection:
        out["text_projection.weight"] = sd["text_projection"].T.contiguous()
    for key, t in sd.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", key)
        if not m or int(m.group(1)) >= num_layers:
            continue
        dst, rest = f"encoder.layers.{m.group(1)}.", m.group(2)
        if rest.startswith("attn.in_proj_"):
            kind = rest.removeprefix("attn.in_proj_")
            for p, chunk in zip("qkv", t.chunk(3)):
                out[f"{dst}self_attn.{p}_proj.{kind}"] = chunk
            continue
        for new, old in CLIP_LAYER:
            rest = rest.replace(old + ".", new + ".") if rest.startswith(old + ".") else rest
        out[dst + rest] = t
    return out
