"""FLUX.1 original single files (Black Forest Labs' reference / ComfyUI layout) <-> ldm's parts.

BFL's ``flux1-dev.safetensors`` holds the bare transformer in its own names (``double_blocks.N.
{img,txt}_{attn,mlp,mod}``, ``single_blocks.N.{linear1,linear2,modulation}``, ``img_in``,
``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``, ``final_layer``); ComfyUI's checkpoints
put it under ``model.diffusion_model.`` beside ``vae.`` (the LDM autoencoder's names, as
``first_stage_model.``) and ``text_encoders.{clip_l,t5xxl}.transformer.`` (comfy
supported_models.Flux; diffusers single_file_utils ``CHECKPOINT_KEY_NAMES["flux"]``). The
original fuses q, k, v (``img_attn.qkv``, ``txt_attn.qkv``) and, in single blocks, q, k, v and
the MLP input (``linear1``); its final adaLN holds (shift, scale) where diffusers' holds (scale,
shift). One table of (diffusers names, original name, op) serves load and save and the LoRA
names (lora_flux.py); tests check it against diffusers' convert_flux_transformer_checkpoint_to_
diffusers. What the keys say about the config is original_flux_config's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.dtypes import to_dtype
from ldm.errors import CheckpointError, ConfigError
from ldm.formats.diffusers_folder import (
    fit_clip_keys,
    load_text_model,
    load_tokenizer,
    load_weights,
    read_json,
)
from ldm.formats.original_config import (
    check_guesses,
    infer_text_config,
    infer_vae_config,
    read_config_metadata,
    read_config_override,
)
from ldm.formats.original_flux_config import (  # noqa: F401 (variant: this module's API too)
    infer_transformer_config,
    single_file_configs,
    variant,
    widths,
)
from ldm.formats.original_keys import UNET, remap, vae_attn_shapes, vae_pairs
from ldm.formats.original_text import (
    clip_from_original,
    clip_to_original,
    infer_t5_config,
    t5_state,
    tokenizer_from_metadata,
)
from ldm.formats.original_vae import load_file_vae
from ldm.formats.safe_load import load_state_dict, read_safetensors_header
from ldm.models import families
from ldm.models.build import build_network, build_text_encoder
from ldm.models.parts import ModelParts
from ldm.text.tokenizer import build_clip_tokenizer

VAE_PREFIXES = ("vae.", "first_stage_model.")  # ComfyUI's; diffusers also reads the LDM one
TEXT_PREFIXES = {  # ldm part -> where a FLUX checkpoint keeps it (transformers' names below)
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.t5xxl.transformer.",
}
TEXT_LABELS = {"text_encoder": "CLIP-L", "text_encoder_2": "T5-XXL"}
TOKENIZER_KEY = "ldm.tokenizer_2"  # safetensors metadata: ldm's export keeps its T5 tokenizer
_SUFFIXES = (".weight", ".bias", "")  # "" for the q/k RMS norms' ``scale`` (a full name)


# ---------------------------------------------------------------- the transformer's names


def transformer_pairs(config: dict) -> list[tuple[tuple[str, ...], str, object]]:
    """(diffusers names, original name, op) for every FLUX tensor group of ``config``.

    op "": one tensor, same values; "swap": the row halves swapped ((shift, scale) <-> (scale,
    shift), diffusers' ``swap_scale_shift``); a tuple of row counts: the original stacks the
    diffusers weights by rows in that order (qkv: 3 x width; linear1: q, k, v, then the MLP).
    Names ending in ``.weight`` / ``.scale`` are whole tensors (the q/k RMS norms).
    """
    width, mlp = widths(config)
    qkv = (width, width, width)
    pairs = [
        (("x_embedder",), "img_in", ""),
        (("context_embedder",), "txt_in", ""),
        (("time_text_embed.timestep_embedder.linear_1",), "time_in.in_layer", ""),
        (("time_text_embed.timestep_embedder.linear_2",), "time_in.out_layer", ""),
        (("time_text_embed.text_embedder.linear_1",), "vector_in.in_layer", ""),
        (("time_text_embed.text_embedder.linear_2",), "vector_in.out_layer", ""),
        (("proj_out",), "final_layer.linear", ""),
        (("norm_out.linear",), "final_layer.adaLN_modulation.1", "swap"),
    ]
    if config.get("guidance_embeds"):  # FLUX.1-dev: the distilled guidance scale's embedding
        g = "time_text_embed.guidance_embedder."
        pairs += [((f"{g}linear_1",), "guidance_in.in_layer", ""),
                  ((f"{g}linear_2",), "guidance_in.out_layer", "")]  # fmt: skip
    for i in range(config["num_layers"]):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        pairs += [
            ((f"{d}norm1.linear",), f"{o}img_mod.lin", ""),  # both (shift, scale, gate) x 2
            ((f"{d}norm1_context.linear",), f"{o}txt_mod.lin", ""),
            (tuple(f"{d}attn.to_{p}" for p in "qkv"), f"{o}img_attn.qkv", qkv),
            (tuple(f"{d}attn.add_{p}_proj" for p in "qkv"), f"{o}txt_attn.qkv", qkv),
            ((f"{d}attn.to_out.0",), f"{o}img_attn.proj", ""),
            ((f"{d}attn.to_add_out",), f"{o}txt_attn.proj", ""),
            ((f"{d}ff.net.0.proj",), f"{o}img_mlp.0", ""),
            ((f"{d}ff.net.2",), f"{o}img_mlp.2", ""),
            ((f"{d}ff_context.net.0.proj",), f"{o}txt_mlp.0", ""),
            ((f"{d}ff_context.net.2",), f"{o}txt_mlp.2", ""),
        ]
        for stream, ours in (("img", ""), ("txt", "added_")):
            pairs += [((f"{d}attn.norm_{ours}{p}.weight",),
                       f"{o}{stream}_attn.norm.{name}_norm.scale", "")
                      for p, name in (("q", "query"), ("k", "key"))]  # fmt: skip
    for i in range(config["num_single_layers"]):
        s, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        linear1 = (*(f"{s}attn.to_{p}" for p in "qkv"), f"{s}proj_mlp")
        pairs += [
            ((f"{s}norm.linear",), f"{o}modulation.lin", ""),  # (shift, scale, gate)
            (linear1, f"{o}linear1", (*qkv, mlp)),
            ((f"{s}proj_out",), f"{o}linear2", ""),  # [attention | MLP] -> width
            ((f"{s}attn.norm_q.weight",), f"{o}norm.query_norm.scale", ""),
            ((f"{s}attn.norm_k.weight",), f"{o}norm.key_norm.scale", ""),
        ]
    return pairs


def _swap(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2)  # (shift, scale) <-> (scale, shift): its own inverse
    return torch.cat([second, first])


def convert_transformer(state: dict, config: dict, to_original: bool, what: str) -> dict:
    """diffusers <-> original FLUX names through ``transformer_pairs``; fused groups split on
    load and fused on save; a missing member of a fused group or a leftover is an error.
    ``state`` is emptied as it is read, so a fused tensor is freed once split (one copy)."""
    left, out = state, {}
    for names, original, op in transformer_pairs(config):
        for suffix in _SUFFIXES:
            if to_original:
                keys = [n + suffix for n in names]
                have = [k in left for k in keys]
                if not any(have):
                    continue
                if not all(have):
                    raise CheckpointError(f"{what}: {original + suffix} needs "
                                          f"{keys[have.index(False)]}")  # fmt: skip
                parts = [left.pop(k) for k in keys]
                t = torch.cat(parts) if len(parts) > 1 else parts[0]
                out[original + suffix] = _swap(t) if op == "swap" else t
            elif original + suffix in left:
                t = left.pop(original + suffix)
                t = _swap(t) if op == "swap" else t
                if not isinstance(op, tuple):
                    out[names[0] + suffix] = t
                    continue
                if t.shape[0] != sum(op):
                    raise CheckpointError(f"{what}: {original + suffix} has {t.shape[0]} rows, "
                                          f"not {' + '.join(map(str, op))}")  # fmt: skip
                # copies, so the fused tensor is freed and no part shares its storage
                out.update({n + suffix: c.clone() for n, c in zip(names, t.split(op))})
    if left:
        shown = ", ".join(sorted(left)[:3]) + (f" (+{len(left) - 3} more)" if len(left) > 3 else "")
        raise CheckpointError(f"{what}: weights with no counterpart in the other layout: {shown}")
    return out


def split_weights(state_dict: dict) -> dict:
    """A FLUX file's weights per ldm part (original names inside each part): the transformer
    under ``model.diffusion_model.`` or bare, the VAE, CLIP-L and T5-XXL where present."""
    weights = {
        "transformer": {k[len(UNET) :]: v for k, v in state_dict.items() if k.startswith(UNET)}
    }
    others = (*VAE_PREFIXES, *TEXT_PREFIXES.values())
    if not weights["transformer"]:  # BFL's own files: the bare transformer
        weights["transformer"] = {k: v for k, v in state_dict.items() if not k.startswith(others)}
    for prefix in VAE_PREFIXES:
        vae = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        weights.setdefault("vae", {}).update(vae)
    for part, prefix in TEXT_PREFIXES.items():
        weights[part] = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return {k: v for k, v in weights.items() if v}


# ---------------------------------------------------------------- load and save


def _config(part: str, stored: dict, given: dict, infer, source: str) -> tuple[dict, dict]:
    """A part's config: ldm's stored one, else inferred from the keys; the user's on top."""
    if part in stored:
        base, notes = dict(stored[part]), {}
    else:
        try:
            base, notes = infer()
        except (KeyError, CheckpointError) as e:
            if part not in given:
                why = e if isinstance(e, CheckpointError) else f"incomplete (no {e})"
                raise CheckpointError(f"{source}: flux {part}: {why}") from None
            base, notes = {}, {}
    if part in given:
        notes = {part: "from the given config"}
    keep = {k: v for k, v in given.get(part, {}).items() if part == "scheduler" or k[0] != "_"}
    return {**base, **keep}, notes


def load_flux_file(path, device="cpu", dtype=torch.float32, config=None, t5: bool = True):
    """Read a FLUX single file through the safe loader (a hostile or truncated file is refused
    as any checkpoint is, before a tensor is touched) and load it (``load_flux``)."""
    path, dtype = Path(path), to_dtype(dtype, "dtype")
    state_dict = load_state_dict(path, check_finite=False, dtype=dtype)  # cast as read
    weights = split_weights(state_dict)
    del state_dict  # each tensor now lives in one part's dict, freed as its module takes it
    header = read_safetensors_header(path) if path.suffix == ".safetensors" else {}
    return load_flux(weights, path, header.get("__metadata__", {}), config, device, dtype, t5)


def load_flux(weights: dict, path: Path, meta: dict, config, device, dtype, t5: bool = True):
    """ldm's parts from a FLUX file's ``split_weights``. Configs: the file's own (``ldm.config``),
    else the keys + FLUX.1's; ``config`` (a dict, YAML or diffusers folder) on top. What the file
    lacks (BFL's files hold the transformer alone) comes from a ``config`` diffusers FLUX folder,
    as diffusers' ``from_single_file`` takes it from its config repo; none is a one-line error.
    ``t5=False`` leaves T5-XXL out (None)."""
    source = str(path)
    stored = read_config_metadata(meta) if meta.get("ldm.family") == "flux" else {}
    given = read_config_override(config)
    for part in set(given) - {"transformer", "vae", "scheduler", *TEXT_PREFIXES}:
        raise ConfigError(f"config: a FLUX file has no {part} (it has a transformer)")
    folder = Path(config) if isinstance(config, (str, Path)) and Path(config).is_dir() else None
    net = weights.pop("transformer", None)
    if not net:
        raise CheckpointError(f"{source}: no FLUX transformer weights (double_blocks.*)")
    net_config, notes = _config("transformer", stored, given,
                                lambda: infer_transformer_config(net, source), source)  # fmt: skip
    inferred = {"family": f"flux ({variant(net_config)})", **notes}
    family = families.get("flux").for_network(net_config)  # no guidance embedding: schnell's
    state = convert_transformer(net, net_config, False, source)  # empties net
    network = build_network(net_config, f"{source} (transformer)", family="flux", empty=True)
    load_weights(network, state, f"{source} (transformer)", device, dtype)
    defaults = single_file_configs(bool(net_config.get("guidance_embeds")))
    vae = _load_vae(weights.pop("vae", None), stored, given, folder, source, device, dtype,
                    inferred)  # fmt: skip
    text = {}
    for part in TEXT_PREFIXES:
        model, tokenizer, notes = _load_text(part, weights.pop(part, None), stored, given, folder,
                                             meta, t5, defaults, source, device, dtype)  # fmt: skip
        text[part], text[part.replace("text_encoder", "tokenizer")] = model, tokenizer
        inferred.update(notes)
    said = "dev" if net_config.get("guidance_embeds") else "schnell"
    scheduler, notes = _config("scheduler", stored, given,
                               lambda: (defaults["scheduler"], {"scheduler": f"FLUX.1-{said}'s"}),
                               source)  # fmt: skip
    inferred.update(notes)
    model_index = {"scheduler": ["diffusers", scheduler["_class_name"]]}
    model_index.update(stored.get("model_index", {}))
    return ModelParts(
        network, vae, text["text_encoder"], text["tokenizer"], scheduler, model_index, path,
        path.stem, inferred, family, text_encoder_2=text["text_encoder_2"],
        tokenizer_2=text["tokenizer_2"],
    )  # fmt: skip


def _load_vae(vae_sd, stored, given, folder, source, device, dtype, inferred):
    """The file's VAE (16 latent channels, scaling and shift FLUX.1's), else the folder's."""

    def config(sd: dict) -> dict:
        def infer():  # shapes over FLUX.1's (its scaling and shift)
            config = infer_vae_config(sd, "flux")
            config.update(use_quant_conv="quant_conv.weight" in sd,
                          use_post_quant_conv="post_quant_conv.weight" in sd)  # fmt: skip
            return config, {"vae.scaling_factor": "0.3611, shift 0.1159 (FLUX.1)"}

        config, notes = _config("vae", stored, given, infer, source)
        inferred.update(notes)
        return config

    vae_sd = {k: v for k, v in (vae_sd or {}).items() if not k.startswith("loss.")}
    return load_file_vae(vae_sd, config, folder, source, device, dtype, inferred,
                         "vae.* or first_stage_model.*")  # fmt: skip


def _load_text(part, state, stored, given, folder, meta, t5, defaults, source, device, dtype):
    """(model, tokenizer, notes) of CLIP-L or T5-XXL: the file's, else the folder's; an absent
    one is a one-line error (T5 with ``t5=False``: None, and a note)."""
    label, prefix, kind = TEXT_LABELS[part], TEXT_PREFIXES[part], "t5" if "2" in part else "clip"
    if kind == "t5" and not t5:
        return None, None, {part: "left out (t5=False)"}
    tokenizer, why = _tokenizer(part, kind, folder, meta)
    if tokenizer is None:
        raise CheckpointError(f"{source}: {why}")
    if not state:
        if folder is not None and (folder / part / "config.json").is_file():
            model = load_text_model(folder / part, read_json(folder / part / "config.json"),
                                    device, dtype)  # fmt: skip
            return model, tokenizer, {part: f"from {folder}"}
        raise CheckpointError(f"{source}: no {label} weights ({prefix}*): pass --config FOLDER, "
                              f"a diffusers FLUX folder that has {part}/")  # fmt: skip
    if kind == "t5":
        state, arch = t5_state(state, False), "T5EncoderModel"

        def infer():
            return {**defaults[part], **infer_t5_config(state)}, {}
    else:
        state, arch = clip_from_original(state, ""), "CLIPTextModel"
        state.pop("text_projection.weight", None)  # FLUX takes the unprojected pooled output

        def infer():
            n = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
            notes = {f"{part}.num_attention_heads": "one head per 64 channels (CLIP)"}
            return infer_text_config(state, "flux", n, part), notes

    config, notes = _config(part, stored, given, infer, source)
    config = {k: v for k, v in config.items() if k[0] != "_"}
    if kind == "clip":
        check_guesses(None, None, [config], source)
    model = build_text_encoder(config, config.get("architectures", [arch])[0], empty=True)
    state = fit_clip_keys(state, model) if kind == "clip" else state
    load_weights(model, state, f"{source} ({part})", device, dtype)
    return model, tokenizer, notes


def _tokenizer(part, kind, folder, meta):
    """(tokenizer, why not): the folder's, ldm's export's own (T5), or built offline (CLIP)."""
    name = part.replace("text_encoder", "tokenizer")
    if folder is not None and (folder / name).is_dir():
        return load_tokenizer(folder / name, kind), ""
    if kind == "clip":
        return build_clip_tokenizer(model_max_length=77), ""
    tokenizer = tokenizer_from_metadata(meta[TOKENIZER_KEY]) if TOKENIZER_KEY in meta else None
    why = ("no T5 tokenizer offline: pass --config FOLDER, a diffusers FLUX folder with "
           "tokenizer_2/ (or leave T5 out)")  # fmt: skip
    return tokenizer, "" if tokenizer is not None else why


def flux_to_original(parts, transformer_only: bool = False) -> dict:
    """ldm's FLUX parts -> one original-keyed state dict: BFL's bare transformer
    (``transformer_only``), else ComfyUI's checkpoint (``model.diffusion_model.``, ``vae.``,
    ``text_encoders.{clip_l,t5xxl}.transformer.``) with every part the model has."""
    config = _config_dict(parts.unet.config)
    net = convert_transformer(parts.unet.state_dict(), config, True, "transformer")
    if transformer_only:
        return net
    out = {UNET + k: v for k, v in net.items()}
    vae = remap(parts.vae.state_dict(), vae_pairs(_config_dict(parts.vae.config)), True, "vae")
    out.update({VAE_PREFIXES[0] + k: v for k, v in vae_attn_shapes(vae, True).items()})
    if parts.text_encoder is not None:
        out.update(clip_to_original(parts.text_encoder.state_dict(), TEXT_PREFIXES["text_encoder"]))
    if getattr(parts, "text_encoder_2", None) is not None:
        t5 = t5_state(parts.text_encoder_2.state_dict(), True)
        out.update({TEXT_PREFIXES["text_encoder_2"] + k: v for k, v in t5.items()})
    return out


def _config_dict(config) -> dict:
    """ldm's config dataclass (``to_diffusers``) or a diffusers config mapping -> a dict."""
    return config.to_diffusers() if hasattr(config, "to_diffusers") else dict(config)
