"""Original single-file checkpoints (CompVis / A1111 / ComfyUI / sgm) <-> ldm's parts.

One file holds every part under a prefix: ``model.diffusion_model.`` (U-Net, the CompVis/sgm
``openaimodel.UNetModel`` names; SDXL's added conditioning is ``label_emb``),
``first_stage_model.`` (KL autoencoder), and the text encoders (ldm.formats.original_text:
``cond_stage_model.*`` in SD 1.x/2.x, ``conditioner.embedders.N.*`` in SDXL and its refiner).
SD3 / SD3.5 files (MMDiT ``joint_blocks``, ``text_encoders.*``) are ldm.formats.original_sd3's,
FLUX.1 files (``double_blocks``, bare or under ``model.diffusion_model.``) original_flux's.
Both directions use one table of (diffusers prefix, original prefix) pairs built from the
architecture (ldm.formats.original_keys), so load and export cannot drift apart; tests check the
tables against diffusers' own converters. Configs come from the file's ``ldm.config`` metadata
when ldm wrote it, else from shapes and the family registry (ldm.formats.original_config);
``config=`` / ``prediction_type=`` override both, and every guess is recorded in
``ModelParts.inferred``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from ldm.dtypes import to_dtype
from ldm.errors import CheckpointError, ConfigError
from ldm.formats import original_flux
from ldm.formats.diffusers_folder import (
    cast,
    fit_clip_keys,
    load_weights,
    normalize_prediction_type,
)
from ldm.formats.original_config import (
    METADATA_KEY,
    check_guesses,
    config_metadata,
    infer_text_config,
    infer_unet_config,
    infer_vae_config,
    read_config_metadata,
    read_config_override,
)
from ldm.formats.original_keys import UNET, VAE, remap, unet_pairs, vae_attn_shapes, vae_pairs
from ldm.formats.original_sd3 import load_sd3, sd3_to_original, split_weights
from ldm.formats.original_text import (
    TOKENIZER_KEY,
    clip_from_original,
    clip_to_original,
    openclip_blocks,
    openclip_from_original,
    openclip_to_original,
    text_towers,
    tokenizer_metadata,
)
from ldm.formats.safe_load import load_state_dict, read_safetensors_header, save_state_dict
from ldm.models import families
from ldm.models.build import build_network, build_text_encoder, build_vae
from ldm.models.parts import ModelParts
from ldm.text.tokenizer import build_clip_tokenizer

PARTS_ORDER = ["unet", "vae", "scheduler"]  # after the text encoders (the U-Net needs their widths)
MODEL_INDEX_FLAGS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")  # SDXL's
# empty marker tensors ComfyUI (and OneTrainer, kohya) put in v-prediction / zero-terminal-SNR
# files (comfy supported_models SDXL.model_type): the only in-file word on the parametrisation
V_PRED, ZTSNR = "v_pred", "ztsnr"
_NOT_CONFIG = ("dtype", "torch_dtype", "transformers_version", "_name_or_path")  # per save


def _sub(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _read_text(state_dict: dict, kind: str, prefix: str, arch: str) -> tuple[dict, int, str]:
    """One text tower in transformers' names, its layer count, and how that count was read."""
    if kind == "openclip":
        blocks = openclip_blocks(state_dict, prefix)
        projection = arch == "CLIPTextModelWithProjection"  # SDXL's bigG keeps every block
        # a full OpenCLIP dump (with text_projection) has one block SD 2.x never runs
        drop = not projection and prefix + "text_projection" in state_dict
        n = blocks - 1 if drop else blocks
        text = openclip_from_original(state_dict, n, prefix, projection)
        return text, n, "" if projection else f"{n} of {blocks} blocks"
    text = clip_from_original(state_dict, prefix)
    n = len({k.split(".")[2] for k in text if k.startswith("encoder.layers.")})
    return text, n, ""


def _hints(keys: set, meta: dict) -> dict:
    """What a file says about its schedule outside ``ldm.config``: older ldm exports'
    ``ldm.prediction_type`` metadata; ComfyUI's ``v_pred`` / ``ztsnr`` marker keys."""
    hints = {}
    if "ldm.prediction_type" in meta:
        kind = normalize_prediction_type(meta["ldm.prediction_type"])
        hints["prediction_type"] = (kind, "file metadata")
    if V_PRED in keys:
        hints["prediction_type"] = ("v_prediction", f"the file's {V_PRED!r} key")
    if ZTSNR in keys:  # zero terminal SNR (Lin et al. 2024, sec. 3.1)
        hints["rescale_betas_zero_snr"] = (True, f"the file's {ZTSNR!r} key")
    return hints


def _infer(part: str, family: str, weights: dict, configs: dict, hints: dict):
    """One part's config as the keys (and the family registry) say, with notes on the guesses."""
    if part == "unet":  # SDXL's added conditioning takes the last encoder's pooled output
        pooled = configs[text_towers(family)[-1][0].subfolder].get("projection_dim")
        return infer_unet_config(weights["unet"], family, pooled)
    if part == "vae":
        return infer_vae_config(weights["vae"], family), {}
    if part == "scheduler":
        scheduler = dict(families.get(family).single_file["scheduler"])
        notes = {"prediction_type": f"{scheduler['prediction_type']} ({family} default)"}
        for key, (value, why) in hints.items():
            scheduler[key] = value
            notes[key] = f"{value} ({why})"
        return scheduler, notes
    text, n, note = weights[part]
    kind = next(spec.kind for spec, _, _ in text_towers(family) if spec.subfolder == part)
    notes = {f"{part}.num_attention_heads": "one head per 64 channels (CLIP)"}
    notes.update({f"{part}.num_hidden_layers": note} if note else {})
    return infer_text_config(text, family, n, part, kind), notes


def _configs(family: str, weights: dict, stored: dict, given: dict, hints: dict, source: str):
    """Every part's config: the file's own (``ldm.config``) where stored, else inferred from the
    keys; what the user gave goes on top (a complete given config needs no inference)."""
    inferred = {"family": f"{family} ({', '.join(p + '*' for _, p, _ in text_towers(family))})"}
    configs = {}
    for part in [spec.subfolder for spec, _, _ in text_towers(family)] + PARTS_ORDER:
        base, notes = stored.get(part), {}
        if part == "scheduler" and base is not None:
            notes = {"prediction_type": f"{base['prediction_type']} (file metadata)"}
        if base is None:
            try:
                base, notes = _infer(part, family, weights, configs, hints)
            except (KeyError, StopIteration, CheckpointError) as e:
                if part not in given:  # a missing weight, or shapes no diffusers config has
                    why = e if isinstance(e, CheckpointError) else f"incomplete (no {e})"
                    raise CheckpointError(f"{source}: {family} {part}: {why}") from None
                base = {}  # the user's config has to say it all
        value = given.get(part, {})
        keep = {k: v for k, v in value.items() if part == "scheduler" or k[0] != "_"}
        configs[part] = {**base, **keep}  # a scheduler's _class_name counts
        if part in given:  # what the user gave replaces the guesses about that part
            notes = {k: v for k, v in notes.items() if k == "prediction_type"}
            notes[part] = "from the given config"
            if "prediction_type" in value:
                notes["prediction_type"] = f"{value['prediction_type']} (from config)"
        inferred.update(notes)
    return configs, inferred


def _metadata(path: Path) -> dict:
    return (
        read_safetensors_header(path).get("__metadata__", {})
        if path.suffix == ".safetensors"
        else {}
    )


def load_single_file(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    config: str | os.PathLike | dict | None = None,
    prediction_type: str | None = None,
    t5: bool = True,  # False: an SD3 / FLUX file's T5-XXL stays unread (SD3: zeros in its place)
) -> ModelParts:
    """Load an original SD 1.x / 2.x / SDXL (base or refiner) / SD3 / FLUX.1 single file into
    ldm's modules."""
    path, dtype = Path(path), to_dtype(dtype, "dtype")
    source = str(path)
    # cast as read (never a second copy in the file's dtype); load_weights checks each part
    state_dict = load_state_dict(path, check_finite=False, dtype=dtype)
    family = families.from_keys(state_dict, source).name  # refuses EDM SDXL by name
    if family in ("sd3", "flux") and prediction_type is not None:
        label = families.get(family).label
        raise ConfigError(f"{source}: {label} is a flow model; --prediction-type does not apply")
    if family == "sd3":
        weights = split_weights(state_dict)
        del state_dict
        return load_sd3(weights, path, _metadata(path), config, device, dtype, t5)
    if family == "flux":  # one copy: each tensor moves to its part's dict, then to its module
        weights = original_flux.split_weights(state_dict)
        del state_dict
        return original_flux.load_flux(weights, path, _metadata(path), config, device, dtype, t5)
    unet_sd = _sub(state_dict, UNET)
    vae_sd = {k: v for k, v in _sub(state_dict, VAE).items() if not k.startswith("loss.")}
    texts = {}
    try:
        for spec, prefix, arch in text_towers(family):
            texts[spec.subfolder] = _read_text(state_dict, spec.kind, prefix, arch)
    except KeyError as e:
        raise CheckpointError(f"{source}: incomplete {family} checkpoint (no {e})") from None
    markers = {k for k in (V_PRED, ZTSNR) if k in state_dict}
    del state_dict  # the parts' dicts hold what is used; each tensor goes once its module has it
    meta = _metadata(path)
    # ldm's own record, trusted only for the family the keys show (a tool that rewrote the
    # weights and kept the metadata would otherwise describe another model)
    stored = read_config_metadata(meta) if meta.get("ldm.family") == family else {}
    given = read_config_override(config)
    weights = {"unet": unet_sd, "vae": vae_sd, **texts}
    del unet_sd, vae_sd, texts
    for part in set(given) - set(weights) - {"scheduler"}:
        raise ConfigError(f"config: this file has no {part}")
    configs, inferred = _configs(family, weights, stored, given, _hints(markers, meta), source)
    if prediction_type is not None:
        configs["scheduler"]["prediction_type"] = normalize_prediction_type(prediction_type)
        inferred["prediction_type"] = f"{configs['scheduler']['prediction_type']} (given)"
    text_parts = [spec.subfolder for spec, _, _ in text_towers(family)]
    check_guesses(configs["unet"], configs["vae"], [configs[p] for p in text_parts], source)

    unet = build_network(configs["unet"], f"{source} (unet)", family=family, empty=True)
    unet_state = remap(weights.pop("unet"), unet_pairs(configs["unet"]), False, source)
    load_weights(unet, unet_state, f"{source} (unet)", device, dtype)
    vae = build_vae(configs["vae"], f"{source} (vae)", empty=True)
    vae_sd = vae_attn_shapes(weights.pop("vae"), False)
    vae_state = remap(vae_sd, vae_pairs(configs["vae"]), False, source)
    del vae_sd
    load_weights(vae, vae_state, f"{source} (vae)", device, dtype)
    text = _load_text_parts(family, configs, weights, source, device, dtype)
    model_index = {"scheduler": ["diffusers", configs["scheduler"]["_class_name"]]}
    model_index.update(stored.get("model_index", {}))
    return ModelParts(
        unet, vae, text["text_encoder"], text["tokenizer"], configs["scheduler"], model_index,
        path, path.stem, inferred, families.get(family), text_encoder_2=text["text_encoder_2"],
        tokenizer_2=text["tokenizer_2"],
    )  # fmt: skip


def _load_text_parts(family: str, configs: dict, weights: dict, source: str, device, dtype):
    """The file's CLIP text encoders (popped from ``weights``) and their offline tokenizers."""
    text = dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    tokenizers = {}
    for spec, _, arch in text_towers(family):
        text_config = {k: v for k, v in configs[spec.subfolder].items() if k[0] != "_"}
        length = text_config["max_position_embeddings"]
        arch = text_config.get("architectures", [arch])[0]
        model = build_text_encoder(text_config, arch, empty=True)
        text_state = fit_clip_keys(weights.pop(spec.subfolder)[0], model)
        load_weights(model, text_state, f"{source} ({spec.subfolder})", device, dtype)
        text[spec.subfolder] = model
        # one BPE build per file: SDXL's second tokenizer is a copy (with its own pad token)
        made = tokenizers.get(length)
        tokenizer = copy.deepcopy(made) if made else build_clip_tokenizer(model_max_length=length)
        tokenizers.setdefault(length, tokenizer)
        if spec.kind == "openclip":
            tokenizer.pad_token = "!"  # OpenCLIP pads with id 0, as diffusers' configs say
        text[spec.tokenizer] = tokenizer
    return text


def to_original_state_dict(parts: ModelParts, family: str | None = None) -> dict:
    """ldm's parts -> one original-keyed state dict (U-Net, VAE, every text encoder)."""
    if (family or parts.family.name) == "sd3":
        return sd3_to_original(parts)
    if (family or parts.family.name) == "flux":  # ComfyUI's layout: transformer, vae., CLIP, T5
        return original_flux.flux_to_original(parts)
    unet = remap(
        parts.unet.state_dict(), unet_pairs(parts.unet.config.to_diffusers()), True, "unet"
    )
    vae = remap(parts.vae.state_dict(), vae_pairs(parts.vae.config.to_diffusers()), True, "vae")
    out = {UNET + k: v for k, v in unet.items()}
    out.update({VAE + k: v for k, v in vae_attn_shapes(vae, True).items()})
    for spec, prefix, _ in text_towers(family or parts.family.name):
        model = getattr(parts, spec.subfolder)
        sgm = prefix.startswith("conditioner.")  # SDXL files also hold two unused tensors
        if spec.kind == "openclip":
            out.update(openclip_to_original(model.state_dict(), prefix, logit_scale=sgm))
        else:
            positions = model.config.max_position_embeddings if sgm else 0
            out.update(clip_to_original(model.state_dict(), prefix, position_ids=positions))
    if parts.prediction_type == "v_prediction":  # what ComfyUI reads it from (and writes)
        out[V_PRED] = torch.tensor([])
        if parts.scheduler_config.get("rescale_betas_zero_snr"):
            out[ZTSNR] = torch.tensor([])
    return out


def part_configs(parts: ModelParts, family: str | None = None) -> dict:
    """Every part's diffusers / transformers config, as ``ldm.config`` metadata stores them."""
    fam = families.get(family or parts.family.name)
    flags = {k: parts.model_index[k] for k in MODEL_INDEX_FLAGS if k in parts.model_index}
    configs = {
        fam.network_folder: parts.unet.config.to_diffusers(),  # unet, or transformer (SD3)
        "vae": parts.vae.config.to_diffusers(),
        "scheduler": dict(parts.scheduler_config),
        "model_index": flags,
    }
    for spec in fam.text_encoders:
        model = getattr(parts, spec.subfolder)
        if model is None:  # the SDXL refiner's first, SD3's T5 when left out
            continue
        text = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_CONFIG}
        configs[spec.subfolder] = {**text, "architectures": [type(model).__name__]}
    return configs


def save_single_file(
    parts: ModelParts,
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    family: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export ``parts`` as one original-keyed ``.safetensors`` file (A1111/ComfyUI), atomically.

    The metadata records every part's config (``ldm.config``), so ldm reloads its own export
    without guessing; other tools ignore it.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: single files are written as .safetensors")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists (choose a new destination)")
    family = family or parts.family.name
    state_dict = cast(to_original_state_dict(parts, family), to_dtype(dtype, "dtype"))
    flow = families.get(family).prediction_type == "flow"  # SD3: no scheduler field says it
    meta = {"format": "pt", "ldm.family": family,
            "ldm.prediction_type": "flow" if flow else parts.prediction_type,
            METADATA_KEY: config_metadata(part_configs(parts, family))}  # fmt: skip
    # no offline T5 tokenizer: ldm keeps it (SD3's third encoder, FLUX's second)
    if family == "flux" and getattr(parts, "tokenizer_2", None) is not None:
        meta[original_flux.TOKENIZER_KEY] = tokenizer_metadata(parts.tokenizer_2)
    elif getattr(parts, "tokenizer_3", None) is not None:
        meta[TOKENIZER_KEY] = tokenizer_metadata(parts.tokenizer_3)
    save_state_dict(state_dict, path, meta)
    return path
