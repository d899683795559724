"""SD3 / SD3.5 original single files (model.diffusion_model.joint_blocks.*, first_stage_model.*,
text_encoders.{clip_l,clip_g,t5xxl}.transformer.*): save, load, detect, refuse -- offline.

Independent routes: diffusers' own converters (``convert_sd3_transformer_checkpoint_to_diffusers``,
``convert_ldm_clip_checkpoint``, ``convert_sd3_t5_checkpoint_to_diffusers``,
``convert_ldm_vae_checkpoint``) read ldm's exports back to the folder's tensors;
``StableDiffusion3Pipeline.from_single_file`` loads them and draws the same image; diffusers'
``infer_diffusers_model_type`` names full-size layouts SD3 / SD3.5-medium / SD3.5-large.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_sd3 import make_tiny_sd3, tiny_sd3, tiny_sd3_no_t5  # noqa: F401 (fixtures)

from ldm.errors import CheckpointError, ConfigError
from ldm.formats.diffusers_folder import load_folder
from ldm.formats.original_sd3 import infer_transformer_config, variant
from ldm.formats.original_text import infer_t5_config
from ldm.formats.safe_load import load_state_dict, read_safetensors_header, save_state_dict
from ldm.formats.single_file import load_single_file, save_single_file, to_original_state_dict
from ldm.models import families
from ldm.pipeline import load_pipeline

NET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L, CLIP_G, T5 = (f"text_encoders.{n}.transformer." for n in ("clip_l", "clip_g", "t5xxl"))
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
SETTINGS = dict(steps=3, guidance_scale=5.0, height=32, width=48, negative_prompt="blurry")
PROMPT = "a red circle left of a blue square"


def _assert_same(a: dict, b: dict, what: str = "") -> None:
    assert set(a) == set(b), (what, sorted(set(a) ^ set(b))[:5])
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (what, k)


def _bare(sd: dict) -> dict:
    return {k.removeprefix("text_model."): v for k, v in sd.items() if "position_ids" not in k}


def _same_parts(ours, ref) -> None:
    for name in PARTS:
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            _assert_same(_bare(a.state_dict()), _bare(b.state_dict()), name)


def _image(model, **kw) -> np.ndarray:
    (out,) = load_pipeline(str(model), "cpu", "fp32", **kw)([PROMPT], [3], **SETTINGS)
    return np.asarray(out.image, dtype=np.int16)


def _one_line(e, path) -> str:
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    return message


@pytest.fixture(scope="module")
def sd35(tmp_path_factory) -> Path:
    """SD3.5-medium-shaped: a dual-attention block (MMDiT-X) and RMS q/k norm."""
    shape = dict(dual_attention_layers=(0,), qk_norm="rms_norm")
    return make_tiny_sd3(tmp_path_factory.mktemp("sd35"), transformer=shape, seed=2)


def test_export_is_what_diffusers_converters_read(tiny_sd3, sd35):  # noqa: F811
    """Every tensor of ldm's file goes back to the folder's through diffusers' converters (SD3
    and SD3.5-medium layouts), under exactly the prefixes the public files use."""
    import diffusers.loaders.single_file_utils as su

    for folder in (tiny_sd3, sd35):
        original = to_original_state_dict(load_folder(folder))
        prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in original}
        assert prefixes == {"model.diffusion_model", "first_stage_model.encoder",
                            "first_stage_model.decoder", "text_encoders.clip_l",
                            "text_encoders.clip_g", "text_encoders.t5xxl"}  # fmt: skip
        assert families.from_keys(original, "f").name == "sd3"
        vae_config = json.loads((folder / "vae/config.json").read_text())
        read = {
            "transformer": su.convert_sd3_transformer_checkpoint_to_diffusers(dict(original)),
            "vae": su.convert_ldm_vae_checkpoint(dict(original), vae_config),
            "text_encoder": su.convert_ldm_clip_checkpoint(dict(original), CLIP_L),
            "text_encoder_2": su.convert_ldm_clip_checkpoint(dict(original), CLIP_G),
            "text_encoder_3": su.convert_sd3_t5_checkpoint_to_diffusers(dict(original)),
        }
        for part, state in read.items():
            name = "model" if part.startswith("text") else "diffusion_pytorch_model"
            ref = load_state_dict(folder / part / f"{name}.safetensors")
            if part == "text_encoder_3":  # the folder keeps one copy of T5's tied embedding
                ref["encoder.embed_tokens.weight"] = ref["shared.weight"]
            _assert_same(_bare(state), _bare(ref), part)
        # how A1111 (encoder.embed_tokens) and diffusers (shared) tell a file holds T5
        assert su.is_t5_in_single_file(original) and f"{T5}encoder.embed_tokens.weight" in original
    attn2 = [k for k in original if ".x_block.attn2." in k or ".ln_q." in k]
    assert attn2 and f"{NET}joint_blocks.0.x_block.attn2.qkv.weight" in original


def test_single_file_round_trip_is_bit_exact_and_draws_the_folders_image(tiny_sd3, tmp_path):  # noqa: F811
    """folder -> `ldm convert --to single-file` -> ldm: the same tensors, nothing guessed (the
    file's ldm.config metadata, its T5 tokenizer kept there too), the same image."""
    from ldm.cli import main

    path = tmp_path / "sd3.safetensors"
    assert main(["convert", str(tiny_sd3), str(path), "--to", "single-file"]) == 0
    meta = read_safetensors_header(path)["__metadata__"]
    assert meta["ldm.family"] == "sd3" and "ldm.tokenizer_3" in meta
    parts, ref = load_single_file(path), load_folder(tiny_sd3)
    assert set(parts.inferred) == {"family"} and "SD3-shaped" in parts.inferred["family"]
    _same_parts(parts, ref)
    assert parts.unet.config == ref.unet.config and parts.vae.config == ref.vae.config
    assert parts.scheduler_config == ref.scheduler_config
    assert parts.tokenizer_3("a red circle").input_ids == ref.tokenizer_3("a red circle").input_ids
    assert np.array_equal(_image(path), _image(tiny_sd3))
    again = tmp_path / "again.safetensors"  # and back out: the very same file contents
    save_single_file(parts, again)
    _assert_same(load_state_dict(again), load_state_dict(path))


def test_file_without_t5_loads_as_the_folder_without_t5(tiny_sd3_no_t5, tiny_sd3, tmp_path):  # noqa: F811
    """No text_encoders.t5xxl.*: zeros in T5's place, as diffusers (the no-T5 folder's image);
    t5=False leaves a file's T5 unread."""
    path = save_single_file(load_folder(tiny_sd3_no_t5), tmp_path / "no_t5.safetensors")
    assert not any(k.startswith("text_encoders.t5xxl.") for k in load_state_dict(path))
    parts = load_single_file(path)
    assert parts.text_encoder_3 is None and "zeros" in parts.inferred["text_encoder_3"]
    _same_parts(parts, load_folder(tiny_sd3_no_t5))
    assert np.array_equal(_image(path), _image(tiny_sd3_no_t5))
    full = save_single_file(load_folder(tiny_sd3), tmp_path / "full.safetensors")
    assert load_single_file(full, t5=False).text_encoder_3 is None


def _identity_clip_l(folder: Path) -> Path:
    """The public SD3 folders' CLIP-L: a square identity text_projection (SD3 uses CLIP-L's
    pooled output unprojected; diffusers' single-file loader puts torch.eye there)."""
    from transformers import CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder")
    hidden = model.config.hidden_size
    model.config.projection_dim = hidden
    square = CLIPTextModelWithProjection(model.config)
    state = model.state_dict()
    state["text_projection.weight"] = torch.eye(hidden)
    square.load_state_dict(state)
    square.save_pretrained(folder / "text_encoder")
    return folder


@pytest.mark.parametrize("t5", [True, False])
def test_diffusers_from_single_file_draws_the_same_image(tmp_path, t5):
    """diffusers' StableDiffusion3Pipeline.from_single_file (offline, the folder as config)
    reads ldm's file as the folder's weights, and its image is ldm's within 2/255."""
    import diffusers

    pooled = 32 + 40  # CLIP-L unprojected (32 wide) + CLIP-G projected (40)
    folder = make_tiny_sd3(tmp_path / "f", t5=t5, transformer=dict(pooled_projection_dim=pooled))
    _identity_clip_l(folder)
    path = save_single_file(load_folder(folder), tmp_path / "m.safetensors")
    cls = diffusers.StableDiffusion3Pipeline
    missing = {} if t5 else dict(text_encoder_3=None, tokenizer_3=None)  # as diffusers asks
    theirs = cls.from_single_file(str(path), config=str(folder), local_files_only=True, **missing)
    ref = cls.from_pretrained(folder, **missing)
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(ref, part) is None:
            assert getattr(theirs, part) is None
            continue
        _assert_same(getattr(theirs, part).state_dict(), getattr(ref, part).state_dict(), part)
    if t5:  # diffusers 0.42's create_diffusers_t5_model_from_checkpoint leaves T5 in training
        assert theirs.text_encoder_3.training  # mode (dropout on); its folder loader does not
        theirs.text_encoder_3.eval()
    theirs.set_progress_bar_config(disable=True)
    s = dict(SETTINGS)
    out = theirs(PROMPT, num_inference_steps=s.pop("steps"),
                 generator=torch.Generator().manual_seed(3), **s).images[0]  # fmt: skip
    expected = np.asarray(out, dtype=np.int16)
    ours = _image(path)
    assert np.abs(ours - expected).max() <= 2
    assert np.array_equal(ours, _image(folder))
    # a file without CLIP-L's projection (Stability's own): ldm puts the identity there too
    plain = {
        k: v for k, v in load_state_dict(path).items() if k != f"{CLIP_L}text_projection.weight"
    }
    save_state_dict(plain, tmp_path / "no_proj.safetensors")
    parts = load_single_file(tmp_path / "no_proj.safetensors", config=folder)
    assert torch.equal(parts.text_encoder.text_projection.weight, torch.eye(32))
    assert "identity" in parts.inferred["text_encoder.text_projection"]


def test_plain_file_takes_configs_and_missing_parts_from_a_folder(tiny_sd3, tmp_path):  # noqa: F811
    """A file from elsewhere (no ldm metadata): the --config folder says what the keys cannot,
    and gives the parts the file lacks (as diffusers' from_single_file takes them from its
    config repo); without it, the tiny shapes (8-wide heads) are refused in one line."""
    original = to_original_state_dict(load_folder(tiny_sd3))
    plain = tmp_path / "plain.safetensors"
    save_state_dict(original, plain)
    parts = load_single_file(plain, config=tiny_sd3)
    assert "file metadata" not in str(parts.inferred)
    _same_parts(parts, load_folder(tiny_sd3))
    with pytest.raises(CheckpointError) as e:
        load_single_file(plain)
    assert "--config" in _one_line(e, plain)
    bare = tmp_path / "transformer_only.safetensors"  # diffusers' SD3Transformer2DModel file
    save_state_dict({k[len(NET) :]: v for k, v in original.items() if k.startswith(NET)}, bare)
    parts = load_single_file(bare, config=tiny_sd3)
    for part in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert parts.inferred[part] == f"from {tiny_sd3}"
    assert np.array_equal(_image_parts(parts), _image(tiny_sd3))  # load_pipeline has no config
    with pytest.raises(ConfigError, match="has no unet"):
        load_single_file(bare, config={"unet": {}})


def test_cli_convert_of_an_incomplete_file_says_what_to_pass(tiny_sd3, tmp_path, capsys):  # noqa: F811
    """`ldm convert` of a transformer-only file: one line naming --config, a non-zero exit;
    with --config FOLDER, a complete diffusers folder with the file's transformer."""
    from ldm.cli import main

    original = to_original_state_dict(load_folder(tiny_sd3))
    bare = tmp_path / "transformer_only.safetensors"
    save_state_dict({k: v for k, v in original.items() if k.startswith(NET)}, bare)
    out = tmp_path / "out"
    assert main(["convert", str(bare), str(out), "--to", "diffusers"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--config" in err[0] and not out.exists()
    assert (
        main(["convert", str(bare), str(out), "--to", "diffusers", "--config", str(tiny_sd3)]) == 0
    )
    _same_parts(load_folder(out), load_folder(tiny_sd3))


def _image_parts(parts) -> np.ndarray:
    from ldm.pipeline import Pipeline

    (out,) = Pipeline(parts, torch.device("cpu"), torch.float32)([PROMPT], [3], **SETTINGS)
    return np.asarray(out.image, dtype=np.int16)


def test_missing_text_encoders_and_vae(tiny_sd3, tmp_path):  # noqa: F811
    """CLIPs or VAE absent and no folder to take them from: one line naming --config; a T5
    whose tokenizer ldm cannot build offline is left out (zeros) and said so."""
    full = save_single_file(load_folder(tiny_sd3), tmp_path / "full.safetensors")
    original, meta = load_state_dict(full), read_safetensors_header(full)["__metadata__"]
    for prefix, words in ((CLIP_L, "no CLIP-L weights"), (CLIP_G, "no CLIP-G weights"),
                          (VAE, "no VAE weights")):  # fmt: skip
        path = tmp_path / "broken.safetensors"
        save_state_dict({k: v for k, v in original.items() if not k.startswith(prefix)}, path, meta)
        with pytest.raises(CheckpointError) as e:
            load_single_file(path)
        assert words in _one_line(e, path) and "--config FOLDER" in str(e.value)
        path.unlink()
    no_tokenizer = {k: v for k, v in meta.items() if k != "ldm.tokenizer_3"}
    save_state_dict(original, tmp_path / "t.safetensors", no_tokenizer)
    parts = load_single_file(tmp_path / "t.safetensors")
    assert parts.text_encoder_3 is None and "no T5 tokenizer" in parts.inferred["text_encoder_3"]


def test_bad_files_are_one_line_errors(tiny_sd3, tmp_path):  # noqa: F811
    full = save_single_file(load_folder(tiny_sd3), tmp_path / "full.safetensors")
    original, meta = load_state_dict(full), read_safetensors_header(full)["__metadata__"]
    qkv = f"{NET}joint_blocks.0.x_block.attn.qkv.weight"
    cases = [
        ({k: v for k, v in original.items() if ".joint_blocks.0." not in k}, "0..N-1"),
        ({**original, f"{NET}joint_blocks.0.x_block.extra.weight": torch.zeros(2)}, "extra"),
        ({**original, qkv: original[qkv][:-1]}, "split in three"),
        ({**original, f"{T5}shared.weight": torch.zeros(7, 5)}, "shape"),
    ]
    for state_dict, words in cases:
        path = tmp_path / "bad.safetensors"
        save_state_dict(state_dict, path, meta)
        with pytest.raises((CheckpointError, ConfigError)) as e:
            load_single_file(path)
        assert words in _one_line(e, path)
        path.unlink()
    with pytest.raises(ConfigError, match="flow model"):
        load_single_file(full, prediction_type="v")


# the published transformer/config.json fields that shape the weights
REAL = {
    "sd3": dict(num_layers=24, num_attention_heads=24, pos_embed_max_size=192),
    "sd35_medium": dict(num_layers=24, num_attention_heads=24, pos_embed_max_size=384,
                        dual_attention_layers=list(range(13)), qk_norm="rms_norm"),
    "sd35_large": dict(num_layers=38, num_attention_heads=38, pos_embed_max_size=192,
                       qk_norm="rms_norm"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(REAL))
def test_full_size_layouts_are_detected_with_their_configs(kind):
    """Real SD3-medium / SD3.5-medium / SD3.5-large shapes on the meta device: ldm's keys are
    what diffusers calls that model, and ldm infers the published config from them."""
    import diffusers.loaders.single_file_utils as su
    from diffusers import SD3Transformer2DModel

    width = REAL[kind]["num_attention_heads"] * 64
    config = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                  attention_head_dim=64, joint_attention_dim=4096, caption_projection_dim=width,
                  pooled_projection_dim=2048, dual_attention_layers=(), qk_norm=None)  # fmt: skip
    config.update(REAL[kind])
    with torch.device("meta"):
        network = SD3Transformer2DModel(**config)
    from ldm.formats.original_sd3 import convert_transformer, transformer_pairs

    c = network.config
    pairs = transformer_pairs(c.num_layers, tuple(c.dual_attention_layers), bool(c.qk_norm))
    net = convert_transformer(network.state_dict(), pairs, True, "meta")
    assert su.infer_diffusers_model_type({NET + k: v for k, v in net.items()}) == kind
    inferred, notes = infer_transformer_config(net)
    for key, want in config.items():
        assert list(inferred[key]) == list(want) if key == "dual_attention_layers" else (
            inferred[key] == want), key  # fmt: skip
    label = {"sd3": "SD3-medium", "sd35_medium": "SD3.5-medium", "sd35_large": "SD3.5-large"}
    assert variant(inferred).startswith(label[kind])


def test_t5_config_from_its_weights(tiny_sd3):  # noqa: F811
    """T5's shape fields come from the weights (heads from the relative-position table)."""
    t5 = load_state_dict(tiny_sd3 / "text_encoder_3" / "model.safetensors")
    ours = infer_t5_config(t5)
    theirs = json.loads((tiny_sd3 / "text_encoder_3" / "config.json").read_text())
    for key in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size",
                "relative_attention_num_buckets", "feed_forward_proj", "is_gated_act"):  # fmt: skip
        assert ours[key] == theirs[key], key
