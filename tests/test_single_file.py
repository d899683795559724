"""Original single files: key maps checked against diffusers' converters, round trips, detection."""

from __future__ import annotations

import json

import pytest
import torch

from ldm.errors import CheckpointError, ConfigError
from ldm.formats.diffusers_folder import load_folder
from ldm.formats.original_config import infer_text_config, infer_unet_config, infer_vae_config
from ldm.formats.original_text import openclip_from_original
from ldm.formats.safe_load import load_state_dict, save_state_dict
from ldm.formats.single_file import load_single_file, save_single_file, to_original_state_dict
from ldm.models import families


@pytest.fixture(params=["sd1", "sd2"])
def tiny(request, tiny_sd1, tiny_sd2):
    return request.param, {"sd1": tiny_sd1, "sd2": tiny_sd2}[request.param]


def _bare(sd: dict) -> dict:
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_export_is_what_diffusers_converters_read(tiny):
    """ldm's export, converted back by diffusers' own converters, equals the original weights."""
    import diffusers.loaders.single_file_utils as su

    family, folder = tiny
    parts = load_folder(folder)
    original = to_original_state_dict(parts)
    assert families.from_keys(original, "export").name == family
    unet_config = json.loads((folder / "unet/config.json").read_text())
    vae_config = json.loads((folder / "vae/config.json").read_text())
    unet = su.convert_ldm_unet_checkpoint(dict(original), unet_config)
    _assert_same(unet, load_state_dict(folder / "unet/diffusion_pytorch_model.safetensors"))
    vae = su.convert_ldm_vae_checkpoint(dict(original), vae_config)
    _assert_same(vae, load_state_dict(folder / "vae/diffusion_pytorch_model.safetensors"))
    if family == "sd1":
        text = su.convert_ldm_clip_checkpoint(dict(original))
    else:
        text = su.convert_open_clip_checkpoint(parts.text_encoder, dict(original))
    _assert_same(_bare(text), _bare(load_state_dict(folder / "text_encoder/model.safetensors")))
    # the original autoencoder's mid-block attention is made of 1x1 convs
    assert original["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4


def _random_original(folder, seed: int = 1) -> dict:
    """Original-keyed weights with fresh random values (layout from a real export)."""
    layout = to_original_state_dict(load_folder(folder))
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in layout.items()}


def test_original_file_round_trip_sd1(tiny_sd1, tmp_path):
    """original keys -> ldm -> export: identical keys and tensors; ldm's load = diffusers'."""
    import diffusers.loaders.single_file_utils as su

    original = _random_original(tiny_sd1)
    extras = {  # found in real files, not part of the model: dropped on load
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "first_stage_model.loss.logvar": torch.zeros(()),
        "alphas_cumprod": torch.rand(1000),
    }
    path = tmp_path / "orig.ckpt"
    torch.save({"state_dict": {**original, **extras}, "global_step": 1}, path)
    parts = load_single_file(path, config=tiny_sd1)
    unet_config = json.loads((tiny_sd1 / "unet/config.json").read_text())
    _assert_same(parts.unet.state_dict(), su.convert_ldm_unet_checkpoint(original, unet_config))
    save_single_file(parts, tmp_path / "back.safetensors")
    _assert_same(load_state_dict(tmp_path / "back.safetensors"), original)


def test_single_file_round_trip_sd2_keeps_v_prediction(tiny_sd2, tmp_path):
    parts = load_folder(tiny_sd2)
    save_single_file(parts, tmp_path / "m.safetensors")
    back = load_single_file(tmp_path / "m.safetensors", config=tiny_sd2)
    assert back.prediction_type == "v_prediction"
    assert back.tokenizer.pad_token == "!"  # OpenCLIP pads with token 0
    for a, b in ((parts.unet, back.unet), (parts.vae, back.vae)):
        _assert_same(a.state_dict(), b.state_dict())
    _assert_same(_bare(parts.text_encoder.state_dict()), _bare(back.text_encoder.state_dict()))


OPENCLIP = families.OPENCLIP_PREFIX


def test_full_openclip_drops_the_unused_last_block(tiny_sd2):
    original = to_original_state_dict(load_folder(tiny_sd2))
    last = f"{OPENCLIP}transformer.resblocks.3."
    for key in [k for k in original if k.startswith(f"{OPENCLIP}transformer.resblocks.2.")]:
        original[key.replace("resblocks.2.", "resblocks.3.")] = original[key].clone()
    original[f"{OPENCLIP}text_projection"] = torch.zeros(32, 32)
    text = openclip_from_original(original, num_layers=3, prefix=OPENCLIP)
    assert not any(k.startswith("encoder.layers.3.") for k in text)
    assert any(k.startswith(last) for k in original)


def test_family_detection():
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    clip = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)}
    openclip = {"cond_stage_model.model.ln_final.weight": torch.zeros(1)}
    assert families.from_keys({**unet, **clip}, "f").name == "sd1"
    assert families.from_keys({**unet, **openclip}, "f").name == "sd2"
    clip_l = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": 0}
    big_g = {"conditioner.embedders.1.model.ln_final.weight": 0}
    refiner = {"conditioner.embedders.0.model.ln_final.weight": 0}
    assert families.from_keys({**unet, **clip_l, **big_g}, "f").name == "sdxl"
    assert families.from_keys({**unet, **refiner}, "f").name == "sdxl-refiner"
    sd3 = {"model.diffusion_model.joint_blocks.0.x.attn.qkv.weight": torch.zeros(1)}
    assert families.from_keys(sd3, "f").name == "sd3"  # tests/test_sd3_single_file.py
    flux = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}
    assert families.from_keys(flux, "f").name == "flux"  # tests/test_flux_wiring.py
    for bad, words in (
        (clip, "no U-Net"),
        (unet, "no text encoder"),
    ):
        with pytest.raises(CheckpointError, match=words):
            families.from_keys(bad, "f.safetensors")


def test_config_inferred_from_shapes(tiny):
    """Everything the weights determine is read back from an export's shapes alone."""
    family, folder = tiny
    original = to_original_state_dict(load_folder(folder))

    def sub(prefix):
        return {k[len(prefix) :]: v for k, v in original.items() if k.startswith(prefix)}

    true = json.loads((folder / "unet/config.json").read_text())
    unet, notes = infer_unet_config(sub("model.diffusion_model."), family)
    for key in ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                "down_block_types", "up_block_types", "cross_attention_dim",
                "use_linear_projection", "transformer_layers_per_block"):  # fmt: skip
        assert unet[key] == true[key], key
    assert "unet.attention_head_dim" in notes  # a guess, and said so
    true = json.loads((folder / "vae/config.json").read_text())
    vae = infer_vae_config(sub("first_stage_model."), family)
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "in_channels"):
        assert vae[key] == true[key], key
    text_state = _bare(load_state_dict(folder / "text_encoder/model.safetensors"))
    layout = "openclip" if family == "sd2" else "clip"
    text = infer_text_config(text_state, family, num_layers=3, layout=layout)
    true = json.loads((folder / "text_encoder/config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "hidden_act", "vocab_size"):
        assert text[key] == true[key], key


def test_prediction_type_default_and_override(tiny_sd2, tmp_path):
    original = to_original_state_dict(load_folder(tiny_sd2))
    assert original.pop("v_pred").numel() == 0  # ComfyUI's v-prediction marker
    path = tmp_path / "plain.safetensors"
    save_state_dict(original, path)  # no ldm metadata, no marker: like Stability's own files
    parts = load_single_file(path, config={"unet": {"attention_head_dim": [2, 4]}, "vae": {
        "norm_num_groups": 8}, "text_encoder": {"num_attention_heads": 4}})  # fmt: skip
    assert parts.prediction_type == "v_prediction"
    assert "default" in parts.inferred["prediction_type"]
    assert parts.inferred["family"].startswith("sd2")
    parts = load_single_file(path, config=tiny_sd2, prediction_type="eps")
    assert parts.prediction_type == "epsilon" and "given" in parts.inferred["prediction_type"]


def test_uninferable_config_asks_for_one(tiny_sd1, tmp_path):
    path = tmp_path / "m.safetensors"
    save_state_dict(to_original_state_dict(load_folder(tiny_sd1)), path)  # no ldm metadata
    with pytest.raises(ConfigError) as e:
        load_single_file(path)  # the tiny VAE's 16 channels do not fit SD's 32 norm groups
    assert str(path) in str(e.value) and "--config" in str(e.value)


def test_cli_convert_both_ways(tiny_sd1, tmp_path, capsys):
    from ldm.cli import main

    single, folder = tmp_path / "m.safetensors", tmp_path / "folder"
    assert main(["convert", str(tiny_sd1), str(single), "--to", "single-file"]) == 0
    argv = ["convert", str(single), str(folder), "--to", "diffusers", "--config", str(tiny_sd1)]
    assert main([*argv, "--prediction-type", "v", "--dtype", "fp16"]) == 0
    assert "inferred prediction_type: v_prediction (given)" in capsys.readouterr().err
    back = load_folder(folder)
    assert back.prediction_type == "v_prediction"
    ref = load_folder(tiny_sd1).unet.state_dict()
    for k, v in back.unet.state_dict().items():
        assert torch.equal(v, ref[k].half().float()), k


def test_openclip_conversion_matches_open_clip():
    """SD 2.x text features: open_clip's penultimate block + ln_final = our CLIPTextModel output."""
    from open_clip.transformer import TextTransformer

    from ldm.formats.diffusers_folder import fit_clip_keys
    from ldm.formats.safe_load import load_into
    from ldm.models.build import build_text_encoder

    torch.manual_seed(0)
    tower = TextTransformer(context_length=77, vocab_size=49408, width=32, heads=4, layers=4,
                            output_dim=32).eval()  # fmt: skip
    for p in tower.parameters():  # open_clip zero-inits some weights; make every one count
        p.data.normal_(0, 0.2)
    original = {OPENCLIP + k: v for k, v in tower.state_dict().items()}
    text_state = openclip_from_original(original, 3, OPENCLIP)
    text = infer_text_config(text_state, "sd2", num_layers=3, layout="openclip")
    model = build_text_encoder({**text, "num_attention_heads": 4}).eval()
    load_into(model, fit_clip_keys(text_state, model), "openclip")
    ids = torch.randint(0, 49406, (2, 77))
    with torch.no_grad():
        x = tower.token_embedding(ids) + tower.positional_embedding
        for block in tower.transformer.resblocks[:-1]:  # SD 2.x: layer="penultimate"
            x = block(x, attn_mask=tower.attn_mask)
        ref = tower.ln_final(x)
        ours = model(ids).last_hidden_state
    assert (ours - ref).abs().max() < 1e-5


SD15_UNET = dict(cross_attention_dim=768, sample_size=64)  # the rest: diffusers' defaults
SD21_UNET = dict(cross_attention_dim=1024, sample_size=96, attention_head_dim=[5, 10, 20, 20],
                 use_linear_projection=True, upcast_attention=True)  # fmt: skip


@pytest.mark.parametrize("family,config", [("sd1", SD15_UNET), ("sd2", SD21_UNET)])
def test_full_size_configs_need_no_override(family, config):
    """Real SD 1.5 / 2.1 layouts (meta tensors, no memory): every field inferred correctly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ldm.formats.original_config import check_guesses
    from ldm.formats.original_keys import remap, unet_pairs, vae_pairs

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip
    true = dict(unet.config)
    original = remap(unet.state_dict(), unet_pairs(true), True, "unet")
    inferred, _ = infer_unet_config(original, family)
    for key, value in inferred.items():
        want = true[key]
        assert (list(want) if isinstance(want, tuple) else want) == value, key
    vae_original = remap(vae.state_dict(), vae_pairs(dict(vae.config)), True, "vae")
    vae_config = infer_vae_config(vae_original, family)
    assert vae_config["block_out_channels"] == [128, 256, 512, 512]
    assert vae_config["layers_per_block"] == 2 and vae_config["latent_channels"] == 4
    hidden = 768 if family == "sd1" else 1024
    text = {"num_attention_heads": hidden // 64, "hidden_size": hidden}
    check_guesses(inferred, vae_config, [text], "real")
