"""SD3 / SD3.5 original single files (Stability's sd3 reference / ComfyUI layout) <-> ldm's parts.

Prefixes: ``model.diffusion_model.`` (the MMDiT in the reference's names: ``joint_blocks.N.
{x_block,context_block}`` with fused ``attn.qkv``, ``attn.ln_q/ln_k``, SD3.5-medium's
``x_block.attn2``, ``adaLN_modulation.1``, ``mlp.fc1/fc2``; ``x_embedder``, ``pos_embed``,
``t_embedder``, ``y_embedder``, ``context_embedder``, ``final_layer``), ``first_stage_model.``
(the KL VAE, the SD table), and ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` holding
transformers' own CLIP / T5 names (diffusers ``single_file_utils.CHECKPOINT_KEY_NAMES``
``clip_sd3`` / ``open_clip_sd3``; ComfyUI ``SD3.text_encoder_key_prefix``). One table of
(diffusers names, original name, operation) serves both directions, as the SD tables do; tests
check it against diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

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
from ldm.formats.original_keys import UNET, VAE, remap, vae_attn_shapes, vae_pairs
from ldm.formats.original_text import (
    SD3_LABELS,
    SD3_PREFIXES,
    TOKENIZER_KEY,
    clip_from_original,
    clip_projection,
    clip_to_original,
    infer_t5_config,
    t5_state,
    tokenizer_from_metadata,
)
from ldm.formats.original_vae import load_file_vae
from ldm.models import families
from ldm.models.build import build_network, build_text_encoder
from ldm.models.parts import ModelParts
from ldm.text.tokenizer import build_clip_tokenizer

HEAD_DIM = 64  # every released MMDiT: heads = width / 64 (= depth: 24 medium, 38 large)
_SUFFIXES = (".weight", ".bias", "")  # "" for pos_embed, a bare tensor


def transformer_pairs(num_layers: int, dual: tuple = (), qk_norm: bool = False) -> list:
    """(diffusers names, original name, op) for every MMDiT tensor group.

    op "qkv": the original fuses q, k, v along the output axis; "swap": the original's adaLN
    output is (shift, scale), diffusers' ``AdaLayerNormContinuous`` (scale, shift) -- the final
    layer and the last block's context norm (diffusers ``swap_scale_shift``).
    """
    pairs = [
        (("pos_embed.pos_embed",), "pos_embed", ""),
        (("pos_embed.proj",), "x_embedder.proj", ""),
        (("time_text_embed.timestep_embedder.linear_1",), "t_embedder.mlp.0", ""),
        (("time_text_embed.timestep_embedder.linear_2",), "t_embedder.mlp.2", ""),
        (("time_text_embed.text_embedder.linear_1",), "y_embedder.mlp.0", ""),
        (("time_text_embed.text_embedder.linear_2",), "y_embedder.mlp.2", ""),
        (("context_embedder",), "context_embedder", ""),
        (("proj_out",), "final_layer.linear", ""),
        (("norm_out.linear",), "final_layer.adaLN_modulation.1", "swap"),
    ]
    for i in range(num_layers):
        d, x, c = (
            f"transformer_blocks.{i}.",
            f"joint_blocks.{i}.x_block.",
            f"joint_blocks.{i}.context_block.",
        )
        last = i == num_layers - 1  # context_pre_only: no context output projection or MLP
        pairs += [
            (tuple(f"{d}attn.to_{p}" for p in "qkv"), f"{x}attn.qkv", "qkv"),
            (tuple(f"{d}attn.add_{p}_proj" for p in "qkv"), f"{c}attn.qkv", "qkv"),
            ((f"{d}attn.to_out.0",), f"{x}attn.proj", ""),
            ((f"{d}norm1.linear",), f"{x}adaLN_modulation.1", ""),
            ((f"{d}norm1_context.linear",), f"{c}adaLN_modulation.1", "swap" if last else ""),
            ((f"{d}ff.net.0.proj",), f"{x}mlp.fc1", ""),
            ((f"{d}ff.net.2",), f"{x}mlp.fc2", ""),
        ]
        if not last:
            pairs += [((f"{d}attn.to_add_out",), f"{c}attn.proj", ""),
                      ((f"{d}ff_context.net.0.proj",), f"{c}mlp.fc1", ""),
                      ((f"{d}ff_context.net.2",), f"{c}mlp.fc2", "")]  # fmt: skip
        if qk_norm:  # SD3.5: RMS norm on q and k (weights only)
            pairs += [((f"{d}attn.norm_{p}",), f"{x}attn.ln_{p}", "") for p in "qk"]
            pairs += [((f"{d}attn.norm_added_{p}",), f"{c}attn.ln_{p}", "") for p in "qk"]
        if i in dual:  # SD3.5-medium (MMDiT-X): a second, image-only attention
            pairs += [(tuple(f"{d}attn2.to_{p}" for p in "qkv"), f"{x}attn2.qkv", "qkv"),
                      ((f"{d}attn2.to_out.0",), f"{x}attn2.proj", "")]  # fmt: skip
            if qk_norm:
                pairs += [((f"{d}attn2.norm_{p}",), f"{x}attn2.ln_{p}", "") for p in "qk"]
    return pairs


def _swap(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2)  # (shift, scale) <-> (scale, shift): its own inverse
    return torch.cat([second, first])


def convert_transformer(state: dict, pairs: list, to_original: bool, what: str) -> dict:
    """Rename (and fuse or split) MMDiT tensors through ``pairs``; leftovers are errors."""
    left, out = dict(state), {}
    for names, original, op in pairs:
        for suffix in _SUFFIXES:
            if to_original:
                keys = [n + suffix for n in names]
                if not all(k in left for k in keys):
                    continue
                parts = [left.pop(k) for k in keys]
                t = torch.cat(parts) if op == "qkv" else parts[0]
                out[original + suffix] = _swap(t) if op == "swap" else t
            elif original + suffix in left:
                t = left.pop(original + suffix)
                t = _swap(t) if op == "swap" else t
                chunks = t.chunk(3) if op == "qkv" else (t,)
                if len(chunks) != len(names) or (op == "qkv" and t.shape[0] % 3):
                    raise CheckpointError(f"{what}: {original + suffix} does not split in three")
                out.update({n + suffix: c for n, c in zip(names, chunks)})
    if left:
        shown = ", ".join(sorted(left)[:3]) + (f" (+{len(left) - 3} more)" if len(left) > 3 else "")
        raise CheckpointError(f"{what}: weights with no counterpart in the other layout: {shown}")
    return out


def layout(keys, source: str = "MMDiT") -> tuple[int, tuple, bool]:
    """(joint blocks, dual-attention blocks, q/k norm) of an original MMDiT state dict."""
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
        shown = sorted(blocks)[:4]
        raise CheckpointError(f"{source}: MMDiT joint blocks {shown}... are not numbered 0..N-1")
    dual = {
        int(m.group(1)) for k in keys if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2", k))
    }
    return len(blocks), tuple(sorted(dual)), any(".attn.ln_q." in k for k in keys)


def infer_transformer_config(net: dict) -> tuple[dict, dict]:
    """A diffusers SD3Transformer2DModel config from original-key shapes, and what was assumed."""
    n, dual, qk = layout(net, "transformer")
    width, in_channels, patch, _ = net["x_embedder.proj.weight"].shape
    positions = net["pos_embed"].shape[1]
    side = math.isqrt(positions)
    if side * side != positions or width % HEAD_DIM:
        raise CheckpointError(f"MMDiT of width {width} with {positions} positions: shapes no "
                              "released SD3 has (pass --config FOLDER)")  # fmt: skip
    config = dict(families.get("sd3").single_file["transformer"])
    config.update(
        patch_size=patch, in_channels=in_channels, num_layers=n,
        out_channels=net["final_layer.linear.weight"].shape[0] // (patch * patch),
        attention_head_dim=HEAD_DIM, num_attention_heads=width // HEAD_DIM,
        joint_attention_dim=net["context_embedder.weight"].shape[1],
        caption_projection_dim=width, pooled_projection_dim=net["y_embedder.mlp.0.weight"].shape[1],
        pos_embed_max_size=side, dual_attention_layers=list(dual),
        qk_norm="rms_norm" if qk else None,
    )  # fmt: skip
    notes = {"transformer.attention_head_dim": f"{HEAD_DIM} (SD3's head width)",
             "transformer.sample_size": f"{config['sample_size']} (SD3 default)"}  # fmt: skip
    return config, notes


def variant(config: dict) -> str:
    """What a transformer config is, in the names people use (SD3-medium, SD3.5-medium/large)."""
    n, width = config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]
    if config.get("dual_attention_layers"):  # MMDiT-X
        name = "SD3.5-medium"
    elif config.get("qk_norm"):
        name = "SD3.5-large" if n == 38 else "SD3.5"
    else:
        name = "SD3-medium" if n == 24 else "SD3"
    return f"{name}-shaped, {n} blocks x {width}"


def check_sizes(network, vae, texts: dict, source: str) -> None:
    """The parts fit each other: pooled CLIP widths, T5's width and the VAE's latent channels
    are what the transformer takes (parts from a --config folder may not be)."""
    net = network.config
    widths = [texts[p].config.projection_dim for p in ("text_encoder", "text_encoder_2")]
    checks = [("pooled text width (CLIP-L + CLIP-G)", sum(widths), net.pooled_projection_dim),
              ("VAE latent channels", vae.config.latent_channels, net.in_channels)]  # fmt: skip
    if texts.get("text_encoder_3") is not None:
        t5 = texts["text_encoder_3"].config.d_model
        checks.append(("T5 width", t5, net.joint_attention_dim))
    for what, have, want in checks:
        if have != want:
            raise CheckpointError(f"{source}: {what} {have} does not fit the transformer's {want}")


# ---------------------------------------------------------------- load and save


def _sub(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _config(part: str, stored: dict, given: dict, source: str, infer) -> tuple[dict, dict]:
    """A part's config: ldm's stored one, else inferred from the keys; the user's on top."""
    base, notes = (stored[part], {}) if part in stored else (None, {})
    if base is None:
        try:
            base, notes = infer()
        except (KeyError, CheckpointError) as e:
            if part not in given:
                why = e if isinstance(e, CheckpointError) else f"incomplete (no {e})"
                raise CheckpointError(f"{source}: sd3 {part}: {why}") from None
            base = {}
    value = given.get(part, {})
    if part in given:
        notes = {part: "from the given config"}
    keep = {k: v for k, v in value.items() if part == "scheduler" or k[0] != "_"}
    return {**base, **keep}, notes


def split_weights(state_dict: dict) -> dict:
    """An SD3 file's weights per ldm part (original names inside each part)."""
    weights = {"transformer": _sub(state_dict, UNET)}
    if not weights["transformer"]:  # a bare MMDiT (diffusers' SD3Transformer2DModel reads it)
        others = (VAE, *SD3_PREFIXES.values())
        weights["transformer"] = {k: v for k, v in state_dict.items() if not k.startswith(others)}
    weights["vae"] = {k: v for k, v in _sub(state_dict, VAE).items() if not k.startswith("loss.")}
    for part, prefix in SD3_PREFIXES.items():
        weights[part] = _sub(state_dict, prefix)
    return {k: v for k, v in weights.items() if v}


def load_sd3(
    weights: dict, path: Path, meta: dict, config, device, dtype, t5: bool = True
) -> ModelParts:
    """ldm's parts from an SD3 / SD3.5 file's ``split_weights``. Configs: the file's own
    (``ldm.config``), else the keys + the family's; ``config`` on top. What the file lacks comes
    from a ``config`` folder, as diffusers' ``from_single_file`` takes it from its config repo;
    T5 may be absent (zeros in its place, as diffusers does without it)."""
    source, family = str(path), families.get("sd3")
    stored = read_config_metadata(meta) if meta.get("ldm.family") == "sd3" else {}
    given = read_config_override(config)
    for part in set(given) - {"transformer", "vae", "scheduler", *SD3_PREFIXES}:
        raise ConfigError(f"config: an SD3 file has no {part} (it has a transformer)")
    folder = Path(config) if isinstance(config, (str, Path)) and Path(config).is_dir() else None
    net = weights.pop("transformer", None)
    if not net:
        raise CheckpointError(f"{source}: no MMDiT weights (model.diffusion_model.joint_blocks.*)")
    configs, inferred = {}, {}
    configs["transformer"], notes = _config("transformer", stored, given, source,
                                            lambda: infer_transformer_config(net))  # fmt: skip
    inferred.update({"family": f"sd3 ({variant(configs['transformer'])})", **notes})
    state = convert_transformer(net, transformer_pairs(*layout(net, source)), False, source)
    network = build_network(configs["transformer"], f"{source} (transformer)", family="sd3",
                            empty=True)  # fmt: skip
    load_weights(network, state, f"{source} (transformer)", device, dtype)
    vae = _load_vae(
        weights.pop("vae", None), stored, given, folder, source, device, dtype, inferred
    )
    text = {}
    for spec in family.text_encoders:
        state = weights.pop(spec.subfolder, None)
        model, tokenizer, notes = _load_text(
            spec, state, stored, given, folder, meta, t5, source, device, dtype
        )
        text[spec.subfolder], text[spec.tokenizer] = model, tokenizer
        inferred.update(notes)
    check_sizes(network, vae, text, source)
    default = dict(family.single_file["scheduler"])
    said = {"scheduler": f"{default['_class_name']}, shift {default['shift']} (SD3 default)"}
    scheduler, notes = _config("scheduler", stored, given, source, lambda: (default, said))
    inferred.update(notes)
    model_index = {"scheduler": ["diffusers", scheduler["_class_name"]]}
    model_index.update(stored.get("model_index", {}))
    return ModelParts(
        network, vae, text.pop("text_encoder"), text.pop("tokenizer"), scheduler, model_index,
        path, path.stem, inferred, family, **text,
    )  # fmt: skip


def _load_vae(vae_sd, stored, given, folder, source, device, dtype, inferred):
    """The file's VAE (its config stored, given or inferred over SD3's), else the folder's."""

    def config(sd: dict) -> dict:
        def infer():
            vae_config = infer_vae_config(sd, "sd3")
            vae_config.update(use_quant_conv="quant_conv.weight" in sd,
                              use_post_quant_conv="post_quant_conv.weight" in sd)  # fmt: skip
            return vae_config, {}

        vae_config, notes = _config("vae", stored, given, source, infer)
        inferred.update(notes)
        return vae_config

    return load_file_vae(vae_sd, config, folder, source, device, dtype, inferred,
                         "first_stage_model.*")  # fmt: skip


def _load_text(spec, state, stored, given, folder, meta, t5, source, device, dtype):
    """(model, tokenizer, notes) of one text encoder: the file's, else the --config folder's;
    a missing CLIP is a one-line error, a missing T5 gives (None, None, why)."""
    part, label, prefix = spec.subfolder, SD3_LABELS[spec.subfolder], SD3_PREFIXES[spec.subfolder]
    if spec.optional and not t5:
        return None, None, {part: "left out (t5=False): zeros in its place"}
    tokenizer, why = _tokenizer(spec, folder, meta)
    if state and tokenizer is None:
        return None, None, {part: f"the file's {label} is not used: {why}"}
    if not state:
        if folder is not None and (folder / part / "config.json").is_file():
            if tokenizer is None:
                return None, None, {part: f"{label} from {folder} is not used: {why}"}
            model = load_text_model(folder / part, read_json(folder / part / "config.json"),
                                    device, dtype)  # fmt: skip
            return model, tokenizer, {part: f"from {folder}"}
        if spec.optional:
            return None, None, {part: f"absent ({prefix}*): zeros in its place, as diffusers"}
        raise CheckpointError(f"{source}: no {label} weights ({prefix}*): pass --config FOLDER, "
                              f"a diffusers SD3 folder that has {part}/")  # fmt: skip
    if spec.kind == "t5":
        state, arch = t5_state(state, False), "T5EncoderModel"

        def infer():
            return infer_t5_config(state), {f"{part}.relative_attention_max_distance": "128 (T5)"}
    else:
        state, arch = clip_from_original(state, ""), "CLIPTextModelWithProjection"
        n = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})

        def infer():
            notes = {f"{part}.num_attention_heads": "one head per 64 channels (CLIP)"}
            return infer_text_config(state, "sd3", n, part, spec.kind), notes

    text_config, notes = _config(part, stored, given, source, infer)
    text_config = {k: v for k, v in text_config.items() if k[0] != "_"}
    if spec.kind != "t5":
        check_guesses(None, None, [text_config], source)
        state, projection = clip_projection(state, part, text_config, part in given, source)
        notes.update({f"{part}.text_projection": projection} if projection else {})
    model = build_text_encoder(text_config, text_config.get("architectures", [arch])[0], empty=True)
    state = fit_clip_keys(state, model) if spec.kind != "t5" else state
    load_weights(model, state, f"{source} ({part})", device, dtype)
    return model, tokenizer, notes


def _tokenizer(spec, folder, meta):
    """(tokenizer, why not): the --config folder's, ldm's export's own (T5), or built (CLIP)."""
    if folder is not None and (folder / spec.tokenizer).is_dir():
        return load_tokenizer(folder / spec.tokenizer, spec.kind), ""
    if spec.kind == "t5":
        tokenizer = tokenizer_from_metadata(meta[TOKENIZER_KEY]) if TOKENIZER_KEY in meta else None
        why = ("no T5 tokenizer offline (pass --config FOLDER, a diffusers SD3 folder with "
               "tokenizer_3/); zeros in its place")  # fmt: skip
        return tokenizer, "" if tokenizer is not None else why
    tokenizer = build_clip_tokenizer(model_max_length=77)
    if spec.kind == "openclip":
        tokenizer.pad_token = "!"  # OpenCLIP pads with id 0, as diffusers' CLIP-G config says
    return tokenizer, ""


def sd3_to_original(parts: ModelParts) -> dict:
    """ldm's SD3 parts -> one original-keyed state dict (every part the model has)."""
    c = parts.unet.config
    pairs = transformer_pairs(c.num_layers, tuple(c.dual_attention_layers), c.qk_norm is not None)
    net = convert_transformer(parts.unet.state_dict(), pairs, True, "transformer")
    out = {UNET + k: v for k, v in net.items()}
    vae = remap(parts.vae.state_dict(), vae_pairs(parts.vae.config.to_diffusers()), True, "vae")
    out.update({VAE + k: v for k, v in vae_attn_shapes(vae, True).items()})
    for spec in parts.family.text_encoders:
        model, prefix = getattr(parts, spec.subfolder), SD3_PREFIXES[spec.subfolder]
        if model is None:
            continue
        if spec.kind == "t5":
            out.update({prefix + k: v for k, v in t5_state(model.state_dict(), True).items()})
        else:
            out.update(clip_to_original(model.state_dict(), prefix))
    return out
