"""FLUX.1 original single files (BFL's bare ``double_blocks.*`` / ComfyUI's checkpoint with
``model.diffusion_model.``, ``vae.``, ``text_encoders.{clip_l,t5xxl}.transformer.``): the key
table, load and save, offline.

Independent route: diffusers' own ``convert_flux_transformer_checkpoint_to_diffusers`` reads
ldm's saves back to diffusers' ``FluxTransformer2DModel`` tensors, key for key. It hard-codes
FLUX.1's width (3072, MLP 12288) for the split of ``linear1``; the tests run it on tiny widths by
handing it a ``torch`` whose ``split`` maps those sizes to the tiny model's (nothing else changes).
"""

from __future__ import annotations

import pickle
import zipfile

import pytest
import torch
from tiny_flux import TRANSFORMER, tiny_flux_dev, tiny_flux_schnell  # noqa: F401 (fixtures)

from ldm.errors import CheckpointError
from ldm.formats.diffusers_folder import load_folder
from ldm.formats.original_config import METADATA_KEY, config_metadata
from ldm.formats.original_flux import (
    TEXT_PREFIXES,
    TOKENIZER_KEY,
    convert_transformer,
    flux_to_original,
    infer_transformer_config,
    load_flux_file,
    split_weights,
    variant,
)
from ldm.formats.original_text import tokenizer_metadata
from ldm.formats.safe_load import save_state_dict
from ldm.models.build import build_network

NET = "model.diffusion_model."
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _diffusers(guidance: bool, seed: int = 0, **over):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    config = dict(TRANSFORMER, guidance_embeds=guidance, num_layers=2, num_single_layers=2, **over)
    return FluxTransformer2DModel(**config), config


def _same(a: dict, b: dict, what: str = "") -> None:
    assert set(a) == set(b), (what, sorted(set(a) ^ set(b))[:5])
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (what, k)


class _TorchAtWidth:
    """``torch`` for diffusers' converter, whose single-block split is FLUX.1's 3072-wide."""

    def __init__(self, width: int):
        self.sizes = (width, width, width, 4 * width)

    def __getattr__(self, name):
        return getattr(torch, name)

    def split(self, t, sizes, dim=0):
        return torch.split(t, self.sizes if tuple(sizes) == (3072,) * 3 + (12288,) else sizes, dim)


def _diffusers_reads(original: dict, width: int, monkeypatch) -> dict:
    from diffusers.loaders import single_file_utils

    monkeypatch.setattr(single_file_utils, "torch", _TorchAtWidth(width))
    return single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(dict(original))


@pytest.mark.parametrize("guidance", [True, False])
def test_original_round_trip_is_strict_and_exact(guidance):
    model, config = _diffusers(guidance)
    state = model.state_dict()
    original = convert_transformer(dict(state), config, True, "save")
    assert not any(
        k.startswith(("transformer_blocks", "single_transformer_blocks")) for k in original
    )
    assert ("guidance_in.in_layer.weight" in original) == guidance
    back = convert_transformer(dict(original), config, False, "load")
    _same(back, state)
    ours = build_network(config, family="flux")  # ldm's transformer takes them strictly
    ours.load_state_dict(back, strict=True)


@pytest.mark.parametrize("guidance", [True, False])
@pytest.mark.parametrize("prefix", ["", NET])
def test_save_is_what_diffusers_converter_reads(guidance, prefix, monkeypatch):
    model, config = _diffusers(guidance, seed=1)
    state = model.state_dict()
    original = convert_transformer(dict(state), config, True, "save")
    width = config["num_attention_heads"] * config["attention_head_dim"]
    read = _diffusers_reads({prefix + k: v for k, v in original.items()}, width, monkeypatch)
    _same(read, state, "diffusers' converter")


def test_fused_layouts_are_bfl_s():
    model, config = _diffusers(True, seed=2)
    sd, o = model.state_dict(), convert_transformer(dict(model.state_dict()), config, True, "")
    d, s = "transformer_blocks.1.", "single_transformer_blocks.1."
    for key in ("weight", "bias"):  # q, k, v stacked by rows; linear1 = [q; k; v; mlp in]
        qkv = torch.cat([sd[f"{d}attn.to_{p}.{key}"] for p in "qkv"])
        assert torch.equal(o[f"double_blocks.1.img_attn.qkv.{key}"], qkv)
        parts = [sd[f"{s}attn.to_{p}.{key}"] for p in "qkv"] + [sd[f"{s}proj_mlp.{key}"]]
        assert torch.equal(o[f"single_blocks.1.linear1.{key}"], torch.cat(parts))
        shift, scale = o[f"final_layer.adaLN_modulation.1.{key}"].chunk(2)  # BFL: (shift, scale)
        assert torch.equal(torch.cat([scale, shift]), sd[f"norm_out.linear.{key}"])
    scale = o["single_blocks.1.norm.query_norm.scale"]
    assert torch.equal(scale, sd[f"{s}attn.norm_q.weight"])


def test_fused_group_missing_a_member_is_named():
    model, config = _diffusers(True)
    state = model.state_dict()
    del state["transformer_blocks.0.attn.to_k.weight"]
    with pytest.raises(CheckpointError, match="img_attn.qkv.weight needs .*to_k"):
        convert_transformer(state, config, True, "save")
    original = convert_transformer(dict(model.state_dict()), config, True, "save")
    original["single_blocks.0.linear1.weight"] = original["single_blocks.0.linear1.weight"][:-1]
    with pytest.raises(CheckpointError, match="linear1.weight has .* rows"):
        convert_transformer(original, config, False, "load")


@pytest.mark.parametrize(("guidance", "in_channels", "name"),
                         [(True, 64, "FLUX.1-dev"), (False, 64, "FLUX.1-schnell"),
                          (True, 384, "FLUX.1-Fill")])  # fmt: skip
def test_config_from_full_size_shapes(guidance, in_channels, name):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):  # FLUX.1's widths, two and three blocks: shapes only
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=3, in_channels=in_channels,
                                       out_channels=64, guidance_embeds=guidance)  # fmt: skip
    config = {**model.config}
    original = convert_transformer(model.state_dict(), config, True, "save")
    inferred, notes = infer_transformer_config(original)
    for key in ("in_channels", "num_layers", "num_single_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
                "guidance_embeds"):  # fmt: skip
        assert inferred[key] == config[key], key
    assert list(inferred["axes_dims_rope"]) == list(config["axes_dims_rope"])
    assert inferred["out_channels"] == (None if in_channels == 64 else 64)
    assert "axes_dims_rope" in next(iter(notes)) and variant(inferred).startswith(name)


def test_config_that_no_release_has_asks_for_a_folder():
    model, config = _diffusers(True)  # 16-wide heads: the RoPE axes cannot be read from keys
    original = convert_transformer(model.state_dict(), config, True, "save")
    with pytest.raises(CheckpointError, match="--config FOLDER"):
        infer_transformer_config(original, "x.safetensors")
    del original["double_blocks.1.img_mod.lin.weight"], original["double_blocks.1.img_mod.lin.bias"]
    original = {k.replace("double_blocks.1.", "double_blocks.2."): v for k, v in original.items()}
    with pytest.raises(CheckpointError, match="not 0..N-1"):
        infer_transformer_config(original, "x.safetensors")


def _bare(sd: dict) -> dict:
    return {k.removeprefix("text_model."): v for k, v in sd.items() if "position_ids" not in k}


def _same_parts(ours, ref, parts=PARTS) -> None:
    for name in parts:
        _same(_bare(getattr(ours, name).state_dict()), _bare(getattr(ref, name).state_dict()), name)


def test_comfyui_checkpoint_saves_and_loads_back(tiny_flux_dev, tmp_path):  # noqa: F811
    ref = load_folder(tiny_flux_dev)
    original = flux_to_original(ref)
    prefixes = (NET, "vae.", *TEXT_PREFIXES.values())
    assert all(k.startswith(prefixes) for k in original)
    assert f"{NET}double_blocks.0.img_attn.qkv.weight" in original
    assert "vae.encoder.mid.attn_1.q.weight" in original  # the LDM autoencoder's names
    assert set(split_weights(original)) == {"transformer", *PARTS[1:]}
    path = tmp_path / "flux-comfy.safetensors"
    # what ldm's export stores beside the weights: every config (tiny shapes no release has:
    # 8 norm groups, 16-wide heads) and the T5 tokenizer, which cannot be built offline
    configs = {"transformer": ref.unet.config.to_diffusers(), "vae": ref.vae.config.to_diffusers(),
               "text_encoder": ref.text_encoder.config.to_dict(),
               "text_encoder_2": ref.text_encoder_2.config.to_dict(),
               "scheduler": dict(ref.scheduler_config)}  # fmt: skip
    meta = {"format": "pt", "ldm.family": "flux", METADATA_KEY: config_metadata(configs),
            TOKENIZER_KEY: tokenizer_metadata(ref.tokenizer_2)}  # fmt: skip
    save_state_dict(original, path, meta)
    parts = load_flux_file(path)
    _same_parts(parts, ref)
    assert parts.family.name == "flux" and parts.scheduler_config["use_dynamic_shifting"]
    assert parts.vae.config.scaling_factor == 0.3611 and parts.vae.config.shift_factor == 0.1159
    assert parts.tokenizer_2("a red circle").input_ids == ref.tokenizer_2("a red circle").input_ids
    assert "FLUX.1-dev" in parts.inferred["family"]
    del meta[METADATA_KEY]  # another tool's file: the given config says what keys cannot
    save_state_dict(original, path, meta)
    _same_parts(load_flux_file(path, config=configs), ref)
    del meta[TOKENIZER_KEY]  # T5's weights but no tokenizer offline: a folder, or T5 left out
    save_state_dict(original, path, meta)
    with pytest.raises(CheckpointError, match="no T5 tokenizer offline"):
        load_flux_file(path, config=configs)
    no_t5 = load_flux_file(path, config=configs, t5=False)
    assert no_t5.text_encoder_2 is None and no_t5.tokenizer_2 is None
    _same_parts(no_t5, ref, PARTS[:3])


def test_bfl_transformer_file_takes_the_rest_from_a_folder(tiny_flux_schnell, tmp_path):  # noqa: F811
    ref = load_folder(tiny_flux_schnell)
    path = tmp_path / "flux1-schnell.safetensors"
    save_state_dict(flux_to_original(ref, transformer_only=True), path)
    parts = load_flux_file(path, config=tiny_flux_schnell)
    _same_parts(parts, ref)
    assert not parts.scheduler_config["use_dynamic_shifting"]  # schnell's, from the folder
    assert parts.family.label == "FLUX.1-schnell" and parts.family.steps == 4
    assert parts.inferred["vae"] == f"from {tiny_flux_schnell}"
    with pytest.raises(CheckpointError, match=r"no VAE weights .*--config FOLDER") as e:
        load_flux_file(path, config={"transformer": dict(ref.unet.config.to_diffusers())})
    assert "\n" not in str(e.value)


def test_hostile_files_are_refused(tmp_path):
    model, config = _diffusers(True)
    original = convert_transformer(model.state_dict(), config, True, "save")
    good = tmp_path / "flux.safetensors"
    save_state_dict(original, good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])  # truncated: the header's offsets overrun the data
    with pytest.raises(CheckpointError):
        load_flux_file(cut)
    evil = tmp_path / "evil.ckpt"  # a pickle that would call a global on load
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError):
        load_flux_file(evil)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _release_shaped_flux(path):
    """A small FluxPipeline folder whose shapes follow the releases' rules (128-wide heads, RoPE
    axes 16/56/56, 32 VAE norm groups, 64-wide CLIP heads, T5's relative distance 128), so a
    file without any config can be read from its keys alone."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers import FluxTransformer2DModel as Flux
    from tiny_flux import SCHEDULER_DEV, _clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ldm.text.tokenizer import build_t5_tokenizer

    torch.manual_seed(3)
    t5 = build_t5_tokenizer()
    t5_config = T5Config(vocab_size=len(t5), d_model=48, d_kv=8, d_ff=64, num_layers=2,
                         num_heads=6, feed_forward_proj="gated-gelu",
                         relative_attention_num_buckets=32,
                         relative_attention_max_distance=128)  # fmt: skip
    clip = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=1,
                          num_hidden_layers=2, hidden_act="quick_gelu")  # fmt: skip
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=0.3611,
                        shift_factor=0.1159)  # fmt: skip
    net = Flux(num_layers=1, num_single_layers=1, num_attention_heads=1, joint_attention_dim=48,
               pooled_projection_dim=64, guidance_embeds=True)  # fmt: skip
    FluxPipeline(transformer=net, vae=vae, text_encoder=CLIPTextModel(clip),
                 tokenizer=_clip_tokenizer(), text_encoder_2=T5EncoderModel(t5_config),
                 tokenizer_2=t5, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_DEV),
                 ).save_pretrained(path)  # fmt: skip
    return path


def test_another_tool_s_checkpoint_is_read_from_its_keys(tmp_path):
    """A ComfyUI checkpoint with no config anywhere: every config from shapes + FLUX.1's."""
    folder = _release_shaped_flux(tmp_path / "folder")
    ref = load_folder(folder)
    path = tmp_path / "comfy.safetensors"
    save_state_dict(
        flux_to_original(ref), path, {TOKENIZER_KEY: tokenizer_metadata(ref.tokenizer_2)}
    )
    parts = load_flux_file(path)
    _same_parts(parts, ref)
    want = ref.unet.config.to_diffusers()
    assert {k: v for k, v in parts.unet.config.to_diffusers().items()} == want
    for name in ("block_out_channels", "layers_per_block", "latent_channels", "scaling_factor",
                 "shift_factor", "use_quant_conv", "norm_num_groups"):  # fmt: skip
        assert getattr(parts.vae.config, name) == getattr(ref.vae.config, name), name
    for a, b in (
        (parts.text_encoder, ref.text_encoder),
        (parts.text_encoder_2, ref.text_encoder_2),
    ):
        ours, theirs = a.config.to_dict(), b.config.to_dict()
        for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                  "hidden_act", "d_model", "num_heads", "d_kv", "d_ff", "num_layers",
                  "relative_attention_max_distance", "feed_forward_proj"):  # fmt: skip
            assert ours.get(k) == theirs.get(k), k
    assert (
        parts.scheduler_config["use_dynamic_shifting"]
        and parts.scheduler_config["max_shift"] == 1.15
    )
    assert {"transformer.axes_dims_rope", "vae.scaling_factor"} <= set(parts.inferred)
