"""Text towers of original single files <-> transformers' CLIP names.

OpenAI CLIP is stored in transformers' own layout under a prefix (SD 1.x
``cond_stage_model.transformer.``, SDXL's first encoder ``conditioner.embedders.0.transformer.``).
OpenCLIP is open_clip's ``TextTransformer`` (SD 2.x ``cond_stage_model.model.``, SDXL's bigG
``conditioner.embedders.1.model.``, the refiner's only encoder ``conditioner.embedders.0.model.``):
``nn.MultiheadAttention`` with q/k/v fused into ``in_proj``, ``ln_1``/``ln_2``,
``mlp.c_fc``/``c_proj``, ``positional_embedding``, ``ln_final``, and ``text_projection`` as a
(width, proj) matrix applied as ``x @ P`` -- the transpose of a Linear's weight (open_clip
``TextTransformer.forward``; diffusers' ``convert_open_clip_checkpoint`` transposes it too).
SD3 files keep CLIP-L, CLIP-G and T5-XXL in transformers' own names under
``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` (diffusers' ``CHECKPOINT_KEY_NAMES``
``clip_sd3`` / ``open_clip_sd3``, ComfyUI's SD3 ``text_encoder_key_prefix``).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import torch

from ldm.errors import CheckpointError, ConfigError
from ldm.models import families
from ldm.models.families import TextEncoderSpec

# where each family's text encoders live in an original file, in the family's encoder order
PREFIXES = {
    "sd1": (families.CLIP_PREFIX,),
    "sd2": (families.OPENCLIP_PREFIX,),
    "sdxl": (families.SDXL_CLIP_PREFIX, families.SDXL_OPENCLIP_PREFIX),
    "sdxl-refiner": (families.REFINER_OPENCLIP_PREFIX,),
}
SD3_PREFIXES = {  # ldm part -> where an SD3 file keeps it (transformers' names below it)
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}
SD3_LABELS = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5-XXL"}
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
    # CLIPTextModelWithProjection (SD3) keeps its projection beside text_model, not in it
    out = {f"{prefix}{'' if k.startswith('text_projection.') else 'text_model.'}{k}": v
           for k, v in _bare(text_state).items()}  # fmt: skip
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


# ---------------------------------------------------------------- SD3: CLIP-L, CLIP-G, T5-XXL


def infer_t5_config(t5: dict) -> dict:
    """A T5EncoderModel config from the weights (T5 v1.1: gated GELU when ``wi_0`` exists)."""
    vocab, d_model = t5["shared.weight"].shape
    attn = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = t5[attn + "relative_attention_bias.weight"].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in t5
    wi = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"
    config = dict(families.get("sd3").single_file["text_encoder_3"])
    config.update(
        vocab_size=vocab, d_model=d_model, num_heads=heads, relative_attention_num_buckets=buckets,
        d_kv=t5[attn + "q.weight"].shape[0] // heads, d_ff=t5[wi].shape[0],
        num_layers=len({k.split(".")[2] for k in t5 if k.startswith("encoder.block.")}),
        feed_forward_proj="gated-gelu" if gated else "relu", is_gated_act=gated,
        dense_act_fn="gelu_new" if gated else "relu",
    )  # fmt: skip
    return config


def t5_state(t5: dict, to_original: bool) -> dict:
    """T5 ties ``encoder.embed_tokens`` to ``shared``. The public SD3 files hold both (A1111
    tells a file with T5 by ``encoder.embed_tokens``, diffusers by ``shared``; stable-diffusion.cpp
    lists the copy as unused), so both are written -- a copy, as safetensors stores no aliases --
    and ``shared`` is the one read."""
    t5 = dict(t5)
    shared = t5.get("shared.weight", t5.get("encoder.embed_tokens.weight"))
    if shared is not None:
        t5["shared.weight"] = shared
        t5["encoder.embed_tokens.weight"] = shared.clone() if to_original else shared
    return t5


def clip_projection(
    text: dict, part: str, config: dict, given: bool = False, source: str = "CLIP-L"
) -> tuple[dict, str]:
    """SD3's CLIP-L pooled output is used unprojected (Stability's reference, ComfyUI
    ``return_projected_pooled=False``, diffusers' single-file loader: an identity
    ``text_projection``); the public diffusers folders hold that identity. A file that keeps a
    projection is read as it is; one without gets the identity (a note says so) unless the
    user's config (``given``) wants another width."""
    if part != "text_encoder" or "text_projection.weight" in text:
        return text, ""
    hidden = text["embeddings.token_embedding.weight"].shape[1]
    if given and config.get("projection_dim", hidden) != hidden:
        raise ConfigError(f"{source}: CLIP-L has no text_projection and the config's "
                          f"projection_dim {config['projection_dim']} is not {hidden}")  # fmt: skip
    config["projection_dim"] = hidden
    eye = torch.eye(hidden, dtype=text["embeddings.token_embedding.weight"].dtype)
    return {**text, "text_projection.weight": eye}, "identity (pooled output unprojected, as SD3)"


TOKENIZER_KEY = "ldm.tokenizer_3"  # safetensors metadata: the T5 tokenizer's files as JSON
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_metadata(tokenizer) -> str:
    """A T5 tokenizer as one metadata string ({file name: text}): ldm reloads its own export
    offline, where the tokenizer cannot be rebuilt (other tools ignore it)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {f.name: f.read_text(encoding="utf-8") for f in Path(tmp).iterdir()
                 if f.name in TOKENIZER_FILES}  # fmt: skip
    return json.dumps(files, separators=(",", ":"))


def tokenizer_from_metadata(text: str):
    """The tokenizer ``tokenizer_metadata`` stored (None when unreadable)."""
    from transformers import AutoTokenizer

    try:
        files = json.loads(text)
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                if name not in TOKENIZER_FILES:
                    return None  # not ours: only the tokenizer's own JSON files
                (Path(tmp) / name).write_text(content, encoding="utf-8")
            return AutoTokenizer.from_pretrained(
                tmp, local_files_only=True, trust_remote_code=False
            )
    except (ValueError, TypeError, AttributeError, OSError):
        return None
