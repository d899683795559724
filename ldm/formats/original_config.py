"""What an original single file's weights say about its diffusers configs, and what they cannot.

Shapes give channels, levels, depths, widths; the family registry
(``ldm.models.families.Family.single_file``) gives what the weights cannot say (scheduler, image
size, upcasting); head counts are the families' own rule (8 heads in SD 1.x, 64-channel heads
elsewhere). A file ldm wrote carries its exact configs in its safetensors metadata
(``ldm.config``), read back before anything is guessed; ``--config`` overrides both.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ldm.errors import CheckpointError, ConfigError
from ldm.formats.diffusers_folder import read_json
from ldm.models import families

# a model's parts by their diffusers folder names (SD3: transformer/, and T5 as text_encoder_3/)
PARTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
         "scheduler")  # fmt: skip
FILES = ("unet/config.json", "transformer/config.json", "vae/config.json",
         "text_encoder/config.json", "text_encoder_2/config.json", "text_encoder_3/config.json",
         "scheduler/scheduler_config.json")  # fmt: skip
METADATA_KEY = "ldm.config"  # safetensors metadata: JSON {part: config} (+ "model_index")
TIME_IDS = {"size": 6, "aesthetic": 5}  # SDXL micro-conditioning ids per kind (Podell et al. 2.2)


def _count(keys, pattern: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def _defaults(family: str, part: str) -> dict:
    return dict(families.get(family).single_file.get(part, {}))


def _unet_levels(unet: dict) -> tuple[list, list, list, list]:
    """Per level: output channels, resnets, has cross-attention, transformer depth."""
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
        depth.append(_count(unet, rf"input_blocks\.{start}\.1\.transformer_blocks\.(\d+)"))
        if f"input_blocks.{idx}.0.op.weight" not in unet:
            return channels, lpb, cross, depth
        idx += 1


def _depths(cross: list, depth: list, mid: int) -> int | list:
    """diffusers' ``transformer_layers_per_block``: one int when every attention agrees; else
    per level, where a level without attention says 1 (SDXL base: [1, 2, 10]) unless it is the
    last, whose entry the mid block takes (diffusers' UNet2DConditionModel)."""
    found = {d for d, c in zip(depth, cross) if c} | ({mid} if mid else set())
    if len(found) <= 1:
        return found.pop() if found else 1
    if cross[-1] and mid and depth[-1] != mid:
        raise CheckpointError(f"mid-block depth {mid} differs from the last level's {depth[-1]}")
    per_level = [d if c else 1 for d, c in zip(depth, cross)]
    per_level[-1] = mid or per_level[-1]
    return per_level


def infer_unet_config(unet: dict, family: str, pooled_dim: int | None = None) -> tuple[dict, dict]:
    """A diffusers U-Net config read from original-key shapes, plus notes on what was assumed.

    ``pooled_dim``: width of the pooled text embedding (SDXL), to split ``label_emb``'s input
    into pooled text + time ids x sinusoid width.
    """
    fam = families.get(family)
    micro = getattr(fam, "micro_conditioning", None)
    if "label_emb.0.0.weight" in unet and micro not in TIME_IDS:
        raise CheckpointError(f"U-Net has added conditioning (label_emb): not a {fam.label} file")
    channels, lpb, cross, depth = _unet_levels(unet)
    mid = _count(unet, r"middle_block\.1\.transformer_blocks\.(\d+)")
    proj = next(k for k in unet if k.endswith("proj_in.weight"))
    to_k = next(k for k in unet if k.endswith("attn2.to_k.weight"))
    config = _defaults(family, "unet")
    config.update(
        in_channels=unet["input_blocks.0.0.weight"].shape[1],
        out_channels=unet["out.2.weight"].shape[0],
        block_out_channels=channels,
        layers_per_block=lpb[0] if len(set(lpb)) == 1 else lpb,
        down_block_types=["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross],
        up_block_types=["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)],
        cross_attention_dim=unet[to_k].shape[1],
        use_linear_projection=unet[proj].ndim == 2,
        transformer_layers_per_block=_depths(cross, depth, mid),
    )
    notes = {f"unet.{k}": f"{config[k]} ({family} default)"
             for k in ("sample_size", "upcast_attention") if k in config}  # fmt: skip
    if family == "sd1":
        notes["unet.attention_head_dim"] = f"{config['attention_head_dim']} heads (SD 1.x)"
    else:
        config["attention_head_dim"] = [max(1, c // 64) for c in channels]
        notes["unet.attention_head_dim"] = "one head per 64 channels"
    if "label_emb.0.0.weight" in unet:  # SDXL: pooled text + time-id sinusoids -> add_embedding
        width = unet["label_emb.0.0.weight"].shape[1]
        n_ids = TIME_IDS[micro]
        if pooled_dim is None or (width - pooled_dim) % n_ids or width <= pooled_dim:
            raise CheckpointError(
                f"U-Net added conditioning of width {width} does not fit {n_ids} time ids and "
                f"a {pooled_dim}-wide pooled text embedding"
            )
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=width,
                      addition_time_embed_dim=(width - pooled_dim) // n_ids)  # fmt: skip
    return config, notes


def infer_vae_config(vae: dict, family: str) -> dict:
    n = _count(vae, r"encoder\.down\.(\d+)\.")
    config = _defaults(family, "vae")
    config.update(
        in_channels=vae["encoder.conv_in.weight"].shape[1],
        out_channels=vae["decoder.conv_out.weight"].shape[0],
        block_out_channels=[
            vae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(n)
        ],
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=_count(vae, r"encoder\.down\.0\.block\.(\d+)\."),
        latent_channels=vae["decoder.conv_in.weight"].shape[1],
    )
    return config


def infer_text_config(
    text: dict, family: str, num_layers: int, part: str = "text_encoder", layout: str = "clip"
) -> dict:
    """A CLIPTextConfig dict for OpenAI CLIP or OpenCLIP (in CLIP's names) from shapes."""
    vocab, hidden = text["embeddings.token_embedding.weight"].shape
    # OpenCLIP uses exact GELU, OpenAI's CLIP quick_gelu; token ids: CLIP's BPE
    config = dict(hidden_act="gelu" if layout == "openclip" else "quick_gelu",
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=1)  # fmt: skip
    config.update(_defaults(family, part))
    config.update(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=text["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden // 64),  # both CLIPs use 64-channel heads
        max_position_embeddings=text["embeddings.position_embedding.weight"].shape[0],
    )
    if "text_projection.weight" in text:  # CLIPTextModelWithProjection: (proj, hidden)
        config["projection_dim"] = text["text_projection.weight"].shape[0]
    return config


def check_guesses(unet: dict | None, vae: dict | None, texts: list[dict], source: str) -> None:
    """Heads and norm groups are not in the weights: a guess that does not fit needs a config
    (``None``: a part not checked, as SD3's transformer, whose heads are 64 wide)."""
    checks = []
    if unet is not None:
        heads, channels = unet["attention_head_dim"], unet["block_out_channels"]
        heads = heads if isinstance(heads, (list, tuple)) else [heads] * len(channels)
        checks += [("attention heads", h, ch) for ch, h in zip(channels, heads)]
        checks += [("norm groups", unet.get("norm_num_groups", 32), ch) for ch in channels]
    if vae is not None:
        vae_groups = vae.get("norm_num_groups", 32)
        checks += [("norm groups", vae_groups, ch) for ch in vae["block_out_channels"]]
    checks += [("text encoder heads", t["num_attention_heads"], t["hidden_size"]) for t in texts]
    for what, n, width in checks:
        if n < 1 or width % n:
            raise ConfigError(
                f"{source}: cannot infer the {what} of a {width}-channel layer ({n} does not "
                "divide it); pass a config (--config FOLDER_OR_YAML)"
            )


def read_config_override(config: str | os.PathLike | dict | None) -> dict[str, dict]:
    """Component configs given by the user: a dict, a diffusers folder, or a model YAML."""
    if config is None:
        return {}
    if isinstance(config, dict):
        unknown = set(config) - set(PARTS)
        if unknown:
            raise ConfigError(f"config: unknown part {sorted(unknown)[0]!r} (expected {PARTS})")
        return config
    path = Path(config)
    if path.is_dir():
        found = {p: read_json(path / f) for p, f in zip(PARTS, FILES) if (path / f).is_file()}
        if not found:
            raise ConfigError(f"{path}: no component configs (unet/config.json, vae/config.json)")
        return found
    if path.suffix in (".yaml", ".yml") and path.is_file():
        from ldm.models.build import load_model_config

        model_config = load_model_config(path)
        return {p: getattr(model_config, p) for p in PARTS if getattr(model_config, p, None)}
    raise ConfigError(f"{path}: --config must be a diffusers folder or a model .yaml file")


def config_metadata(configs: dict) -> str:
    """The ``ldm.config`` metadata value: every part's config as compact JSON."""
    return json.dumps(configs, sort_keys=True, separators=(",", ":"), default=str)


def read_config_metadata(metadata: dict) -> dict:
    """The configs an ``ldm.config`` metadata entry holds ({} when absent or unreadable)."""
    try:
        configs = json.loads(metadata.get(METADATA_KEY, "{}"))
    except ValueError:
        return {}  # not ours after all: infer from the keys as for any other file
    if not isinstance(configs, dict):
        return {}
    return {
        k: v for k, v in configs.items() if k in (*PARTS, "model_index") and isinstance(v, dict)
    }
