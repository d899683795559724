"""Original single-file checkpoints (CompVis / A1111 / ComfyUI) <-> ldm's diffusers-named parts.

One file holds every part under a prefix: ``model.diffusion_model.`` (U-Net, CompVis
``openaimodel.UNetModel`` names), ``first_stage_model.`` (KL autoencoder), and
``cond_stage_model.transformer.`` (OpenAI CLIP, SD 1.x) or ``cond_stage_model.model.`` (OpenCLIP,
SD 2.x). Both directions use one table of (diffusers prefix, original prefix) pairs built from
the architecture (ldm.formats.original_keys), so load and export cannot drift apart; tests
check the table against diffusers' own converters. What the keys cannot tell (head counts,
v-prediction, image size) comes from the real SD 1.5 / SD 2.1 configs or an explicit
``config=`` / ``prediction_type=``, and every guess is recorded in ``ModelParts.inferred``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ldm.dtypes import to_dtype
from ldm.errors import CheckpointError, ConfigError
from ldm.formats.diffusers_folder import (
    cast,
    fit_clip_keys,
    load_weights,
    normalize_prediction_type,
    read_json,
)
from ldm.formats.original_keys import (
    CLIP,
    OPENCLIP,
    UNET,
    VAE,
    clip_to_original,
    openclip_from_original,
    openclip_to_original,
    remap,
    unet_pairs,
    vae_attn_shapes,
    vae_pairs,
)
from ldm.formats.safe_load import load_state_dict, read_safetensors_header, save_state_dict
from ldm.models import families
from ldm.models.build import (
    build_network,
    build_text_encoder,
    build_vae,
    load_model_config,
)
from ldm.models.parts import ModelParts
from ldm.text.tokenizer import build_clip_tokenizer

# ---------------------------------------------------------------- what the keys tell


def _sub(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _count(keys, pattern: str) -> int:
    found = {m.group(1) for k in keys if (m := re.match(pattern, k))}
    return len(found)


def infer_unet_config(unet: dict, family: str) -> tuple[dict, dict]:
    """A diffusers U-Net config read from original-key shapes, plus notes on what was assumed."""
    if any(k.startswith("label_emb") for k in unet):
        raise CheckpointError("U-Net has class/added conditioning (label_emb): not supported")
    channels, lpb, cross, depth, idx = [], [], [], [], 1
    while True:  # one level: consecutive resnet entries, then a downsampler unless the last
        start = idx
        while f"input_blocks.{idx}.0.in_layers.0.weight" in unet:
            idx += 1
        if idx == start:
            raise KeyError(f"input_blocks.{idx}.0.in_layers.0.weight")
        channels.append(unet[f"input_blocks.{start}.0.out_layers.3.weight"].shape[0])
        lpb.append(idx - start)
        cross.append(f"input_blocks.{start}.1.proj_in.weight" in unet)
        depth.append(max(1, _count(unet, rf"input_blocks\.{start}\.1\.transformer_blocks\.(\d+)")))
        if f"input_blocks.{idx}.0.op.weight" not in unet:
            break
        idx += 1
    proj = next(k for k in unet if k.endswith("proj_in.weight"))
    to_k = next(k for k in unet if k.endswith("attn2.to_k.weight"))
    config = dict(
        in_channels=unet["input_blocks.0.0.weight"].shape[1],
        out_channels=unet["out.2.weight"].shape[0],
        block_out_channels=channels,
        layers_per_block=lpb[0] if len(set(lpb)) == 1 else lpb,
        down_block_types=["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross],
        up_block_types=["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)],
        cross_attention_dim=unet[to_k].shape[1],
        use_linear_projection=unet[proj].ndim == 2,
        transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else depth,
        **families.get(family).single_file["unet"],
    )
    notes = {
        f"unet.{k}": f"{config[k]} ({family} default)" for k in ("sample_size", "upcast_attention")
    }
    if family == "sd2":
        config["attention_head_dim"] = [max(1, c // 64) for c in channels]
        notes["unet.attention_head_dim"] = "one head per 64 channels (SD 2.x)"
    else:
        notes["unet.attention_head_dim"] = "8 heads (SD 1.x)"
    return config, notes


def _check_guesses(unet: dict, vae: dict, text: dict, source: str) -> None:
    """Heads and norm groups are not in the weights: a guess that does not fit needs a config."""
    heads, channels = unet["attention_head_dim"], unet["block_out_channels"]
    heads = heads if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    checks = [("attention heads", h, ch) for ch, h in zip(channels, heads)]
    checks += [("norm groups", unet.get("norm_num_groups", 32), ch) for ch in channels]
    vae_groups = vae.get("norm_num_groups", 32)
    checks += [("norm groups", vae_groups, ch) for ch in vae["block_out_channels"]]
    checks += [("text encoder heads", text["num_attention_heads"], text["hidden_size"])]
    for what, n, width in checks:
        if n < 1 or width % n:
            raise ConfigError(
                f"{source}: cannot infer the {what} of a {width}-channel layer ({n} does not "
                "divide it); pass a config (--config FOLDER_OR_YAML)"
            )


def infer_vae_config(vae: dict, family: str) -> dict:
    n = _count(vae, r"encoder\.down\.(\d+)\.")
    return dict(
        in_channels=vae["encoder.conv_in.weight"].shape[1],
        out_channels=vae["decoder.conv_out.weight"].shape[0],
        block_out_channels=[
            vae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(n)
        ],
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=_count(vae, r"encoder\.down\.0\.block\.(\d+)\."),
        latent_channels=vae["decoder.conv_in.weight"].shape[1],
        **families.get(family).single_file["vae"],
    )


def infer_text_config(text: dict, family: str, num_layers: int) -> dict:
    """A CLIPTextConfig dict for CLIP-L (SD 1.x) or OpenCLIP-H (SD 2.x) from shapes."""
    vocab, hidden = text["embeddings.token_embedding.weight"].shape
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=text["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden // 64),  # both CLIPs use 64-channel heads
        max_position_embeddings=text["embeddings.position_embedding.weight"].shape[0],
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
        **families.get(family).single_file["text_encoder"],
    )


def read_config_override(config: str | os.PathLike | dict | None) -> dict[str, dict]:
    """Component configs given by the user: a dict, a diffusers folder, or a model YAML."""
    parts = ("unet", "vae", "text_encoder", "scheduler")
    if config is None:
        return {}
    if isinstance(config, dict):
        unknown = set(config) - set(parts)
        if unknown:
            raise ConfigError(f"config: unknown part {sorted(unknown)[0]!r} (expected {parts})")
        return config
    path = Path(config)
    if path.is_dir():
        files = ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "scheduler/scheduler_config.json")  # fmt: skip
        found = {p: read_json(path / f) for p, f in zip(parts, files) if (path / f).is_file()}
        if not found:
            raise ConfigError(f"{path}: no component configs (unet/config.json, vae/config.json)")
        return found
    if path.suffix in (".yaml", ".yml") and path.is_file():
        model_config = load_model_config(path)
        return {p: getattr(model_config, p) for p in parts if getattr(model_config, p)}
    raise ConfigError(f"{path}: --config must be a diffusers folder or a model .yaml file")


def _merge(base: dict, given: dict | None) -> dict:
    return {**base, **{k: v for k, v in (given or {}).items() if not k.startswith("_")}}


def load_single_file(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    config: str | os.PathLike | dict | None = None,
    prediction_type: str | None = None,
) -> ModelParts:
    """Load an original SD 1.x / 2.x single file into ldm's modules; guesses go to ``inferred``."""
    path, dtype = Path(path), to_dtype(dtype, "dtype")
    source = str(path)
    state_dict = load_state_dict(path, check_finite=False)  # load_weights checks each part
    family = families.from_keys(state_dict, source).name
    inferred = {"family": f"{family} ({'OpenCLIP' if family == 'sd2' else 'CLIP'} text keys)"}
    unet_sd = _sub(state_dict, UNET)
    vae_sd = {k: v for k, v in _sub(state_dict, VAE).items() if not k.startswith("loss.")}
    try:
        if family == "sd1":
            text_sd = {k.removeprefix("text_model."): v for k, v in _sub(state_dict, CLIP).items()}
            num_layers = _count(text_sd, r"encoder\.layers\.(\d+)\.")
        else:
            blocks = _count(_sub(state_dict, OPENCLIP), r"transformer\.resblocks\.(\d+)\.")
            # a full OpenCLIP dump (with text_projection) has one block SD 2.x never runs
            num_layers = blocks - 1 if OPENCLIP + "text_projection" in state_dict else blocks
            inferred["text_encoder.num_hidden_layers"] = f"{num_layers} of {blocks} blocks"
            text_sd = openclip_from_original(state_dict, num_layers)
        unet_config, notes = infer_unet_config(unet_sd, family)
        vae_config = infer_vae_config(vae_sd, family)
        text_config = infer_text_config(text_sd, family, num_layers)
    except (KeyError, StopIteration) as e:
        raise CheckpointError(f"{source}: incomplete {family} checkpoint (no {e})") from None
    inferred.update(notes)
    inferred["text_encoder.num_attention_heads"] = "one head per 64 channels (CLIP)"
    scheduler = dict(families.get(family).single_file["scheduler"])
    inferred["prediction_type"] = f"{scheduler['prediction_type']} ({family} default)"
    meta = (
        read_safetensors_header(path).get("__metadata__", {})
        if path.suffix == ".safetensors"
        else {}
    )
    if "ldm.prediction_type" in meta:  # written by save_single_file
        scheduler["prediction_type"] = normalize_prediction_type(meta["ldm.prediction_type"])
        inferred["prediction_type"] = f"{scheduler['prediction_type']} (file metadata)"

    given = read_config_override(config)
    unet_config = _merge(unet_config, given.get("unet"))
    vae_config = _merge(vae_config, given.get("vae"))
    text_config = _merge(text_config, given.get("text_encoder"))
    scheduler = {**scheduler, **given.get("scheduler", {})}
    for part in given:  # what the user gave replaces the guesses about that part
        inferred = {k: v for k, v in inferred.items() if not k.startswith(f"{part}.")}
        inferred[part] = f"from config {config if not isinstance(config, dict) else '(dict)'}"
    if "prediction_type" in given.get("scheduler", {}):
        inferred["prediction_type"] = f"{scheduler['prediction_type']} (from config)"
    if prediction_type is not None:
        scheduler["prediction_type"] = normalize_prediction_type(prediction_type)
        inferred["prediction_type"] = f"{scheduler['prediction_type']} (given)"

    _check_guesses(unet_config, vae_config, text_config, source)
    unet = build_network(unet_config, f"{source} (unet)", family=family, empty=True)
    unet_state = remap(unet_sd, unet_pairs(unet_config), False, source)
    load_weights(unet, unet_state, f"{source} (unet)", device, dtype)
    vae = build_vae(vae_config, f"{source} (vae)", empty=True)
    vae_state = remap(vae_attn_shapes(vae_sd, False), vae_pairs(vae_config), False, source)
    load_weights(vae, vae_state, f"{source} (vae)", device, dtype)
    text_encoder = build_text_encoder(text_config, empty=True)
    text_sd = {k: v for k, v in text_sd.items() if not k.endswith("position_ids")}
    text_sd = fit_clip_keys(text_sd, text_encoder)
    load_weights(text_encoder, text_sd, f"{source} (text encoder)", device, dtype)
    tokenizer = build_clip_tokenizer(model_max_length=text_config["max_position_embeddings"])
    if family == "sd2":
        tokenizer.pad_token = "!"  # OpenCLIP pads with token 0, as diffusers' SD 2 tokenizer does
    model_index = {"scheduler": ["diffusers", scheduler["_class_name"]]}
    return ModelParts(
        unet, vae, text_encoder, tokenizer, scheduler, model_index, path, path.stem, inferred,
        families.get(family),
    )  # fmt: skip


def to_original_state_dict(parts: ModelParts, family: str | None = None) -> dict:
    """ldm's parts -> one original-keyed state dict (U-Net, VAE, CLIP or OpenCLIP)."""
    unet = remap(
        parts.unet.state_dict(), unet_pairs(parts.unet.config.to_diffusers()), True, "unet"
    )
    vae = remap(parts.vae.state_dict(), vae_pairs(parts.vae.config.to_diffusers()), True, "vae")
    out = {UNET + k: v for k, v in unet.items()}
    out.update({VAE + k: v for k, v in vae_attn_shapes(vae, True).items()})
    family = family or parts.family.name
    text = parts.text_encoder.state_dict()
    out.update(openclip_to_original(text) if family == "sd2" else clip_to_original(text))
    return out


def save_single_file(
    parts: ModelParts,
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    family: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export ``parts`` as one original-keyed ``.safetensors`` file (A1111/ComfyUI), atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: single files are written as .safetensors")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists (choose a new destination)")
    family = family or parts.family.name
    state_dict = cast(to_original_state_dict(parts, family), to_dtype(dtype, "dtype"))
    meta = {"format": "pt", "ldm.family": family, "ldm.prediction_type": parts.prediction_type}
    save_state_dict(state_dict, path, meta)
    return path
