"""SD3 text conditioning (ldm.text.sd3) against diffusers' StableDiffusion3Pipeline.encode_prompt
on a tiny random folder (tests/tiny_sd3.py), with and without T5; the offline T5 tokenizer; the
A1111 route (emphasis, chunks, BREAK) by its closed forms; the fixture itself in diffusers."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_sd3 import tiny_sd3, tiny_sd3_no_t5  # noqa: F401  (fixtures)

from ldm.errors import LdmError
from ldm.models.families import FAMILIES, Family, TextEncoderSpec
from ldm.models.parts import ModelParts
from ldm.text.encoders import text_encoder_for
from ldm.text.prompts import emphasize, encode_cond_uncond, encode_prompts, prompt_chunks
from ldm.text.sd3 import SD3TextEncoder, check_max_sequence_length

# until the lead's registry has it: the family as the issue describes it
SD3 = FAMILIES.get("sd3") or Family(
    name="sd3", label="Stable Diffusion 3", pipeline_class="StableDiffusion3Pipeline",
    network="SD3Transformer2DModel", text_combine="sd3", prediction_type="flow",
    vae_scaling_factor=1.5305, vae_shift_factor=0.0609,
    text_encoders=(
        TextEncoderSpec("clip", hidden="penultimate"),
        TextEncoderSpec("openclip", "text_encoder_2", "tokenizer_2", hidden="penultimate"),
        TextEncoderSpec("t5", "text_encoder_3", "tokenizer_3"),
    ),
)  # fmt: skip
PROMPTS = ["a photo of an astronaut riding a horse", "Two small circles, blue sky."]
NEGATIVES = ["blurry, low quality", ""]


@lru_cache  # each folder loads once per module (nothing here changes the weights)
def _diffusers(folder: Path, t5: bool):
    from diffusers import StableDiffusion3Pipeline

    missing = {} if t5 else dict(text_encoder_3=None, tokenizer_3=None)
    return StableDiffusion3Pipeline.from_pretrained(folder, **missing)


@lru_cache
def _parts(folder: Path) -> ModelParts:
    """ModelParts from the folder's transformers modules, loaded apart from diffusers' pipeline."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    def tokenizer(sub):
        return AutoTokenizer.from_pretrained(folder / sub, local_files_only=True)

    def model(cls, sub):
        return cls.from_pretrained(folder / sub).eval()

    t5 = (folder / "text_encoder_3").is_dir()
    network = SimpleNamespace(config={"joint_attention_dim": 96})  # only its text width is read
    return ModelParts(
        unet=network, vae=None, scheduler_config={}, family=SD3,
        text_encoder=model(CLIPTextModelWithProjection, "text_encoder"),
        tokenizer=tokenizer("tokenizer"),
        text_encoder_2=model(CLIPTextModelWithProjection, "text_encoder_2"),
        tokenizer_2=tokenizer("tokenizer_2"),
        text_encoder_3=model(T5EncoderModel, "text_encoder_3") if t5 else None,
        tokenizer_3=tokenizer("tokenizer_3") if t5 else None,
    )  # fmt: skip


@pytest.fixture(scope="module", params=[True, False], ids=["t5", "no_t5"])
def both(request, tiny_sd3, tiny_sd3_no_t5):  # noqa: F811
    """(diffusers pipeline, ldm ModelParts, has T5) for the folder with T5 and the one without."""
    folder = tiny_sd3 if request.param else tiny_sd3_no_t5
    return _diffusers(folder, request.param), _parts(folder), request.param


def _reference(pipe, prompts, negatives=None, max_sequence_length=256):
    with torch.no_grad():
        return pipe.encode_prompt(
            prompts, None, None, device="cpu", negative_prompt=negatives,
            do_classifier_free_guidance=negatives is not None,
            max_sequence_length=max_sequence_length,
        )  # fmt: skip


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_sequence_length", [256, 77, 512])
def test_encode_equals_diffusers(both, max_sequence_length):
    pipe, parts, has_t5 = both
    encoder = text_encoder_for(parts, max_sequence_length=max_sequence_length)
    assert isinstance(encoder, SD3TextEncoder)
    context, _, pooled, _ = _reference(pipe, PROMPTS, max_sequence_length=max_sequence_length)
    with torch.no_grad():
        cond = encoder.encode(PROMPTS)
    assert cond.context.shape == (2, 77 + max_sequence_length, 96)
    assert cond.pooled.shape == (2, 24 + 40) and cond.mask.all()
    _close(cond.context, context)
    _close(cond.pooled, pooled)
    t5_block = cond.context[:, 77:]
    assert bool((t5_block == 0).all()) != has_t5  # no T5: exactly zeros, as diffusers
    assert bool((cond.context[:, :77, 32 + 48 :] == 0).all())  # CLIP block padded to T5's width


def test_cond_uncond_equals_diffusers(both):
    """The pipeline's route (A1111 syntax, one batch for prompts and negatives) on plain prompts."""
    pipe, parts, _ = both
    encoder = text_encoder_for(parts)
    context, neg_context, pooled, neg_pooled = _reference(pipe, PROMPTS, NEGATIVES)
    with torch.no_grad():
        cond, uncond = encode_cond_uncond(encoder, PROMPTS, NEGATIVES)
        alone = encode_prompts(encoder, PROMPTS[1:])  # batch of one: rows do not mix
    _close(cond.context, context)
    _close(cond.pooled, pooled)
    _close(uncond.context, neg_context)
    _close(uncond.pooled, neg_pooled)
    _close(alone.context, context[1:])


def test_long_prompts_truncate_as_diffusers_in_encode(both):
    """encode truncates CLIP at 77 and T5 at max_sequence_length (diffusers); encode_prompts
    chunks CLIP (2 windows) and truncates T5 the same way."""
    pipe, parts, has_t5 = both
    encoder = text_encoder_for(parts, max_sequence_length=20)
    long = " ".join(["a red cat on the table"] * 16)  # > 75 CLIP, > 19 T5 tokens; no commas
    context, _, pooled, _ = _reference(pipe, [long], max_sequence_length=20)
    with torch.no_grad():
        plain, chunked = encoder.encode([long]), encode_prompts(encoder, [long])
    _close(plain.context, context)
    _close(plain.pooled, pooled)
    assert len(prompt_chunks(encoder, long)) == 2
    assert chunked.context.shape == (1, 2 * 77 + 20, 96)
    _close(chunked.context[:, :77], plain.context[:, :77])  # first window: same 75 tokens
    _close(chunked.context[:, 154:], plain.context[:, 77:])  # the same truncated T5 block
    _close(chunked.pooled, plain.pooled)
    padded = encode_prompts(encoder, ["a red cat"], min_chunks=3)  # ldm batch pads chunk counts
    assert padded.context.shape == (1, 3 * 77 + 20, 96)


def test_emphasis_and_break_on_both_blocks(tiny_sd3):  # noqa: F811
    """T5 reads the text without its markup; emphasis weights its states by the CLIP rule."""
    parts = _parts(tiny_sd3)
    encoder = text_encoder_for(parts, max_sequence_length=16)
    t5 = encoder.t5
    with torch.no_grad():
        plain = encoder.encode(["a red cat"])
        weighted = encode_prompts(encoder, ["a (red:1.5) cat"])
        broken = encode_prompts(encoder, ["a red cat BREAK a blue dog"])
        joined = encoder.encode(["a red cat a blue dog"])
    # T5 tokens of "a ", "red", " cat" are those of "a red cat": weights [1, 1.5, 1] on them
    ids = t5.tokenize(["a red cat"])[0]
    assert [i for p in t5.tokenize(["a ", "red", " cat"]) for i in p] == ids
    weights = torch.ones(16)
    weights[1] = 1.5
    _close(weighted.context[:, 77:], emphasize(plain.context[0, 77:], weights)[None])
    assert not torch.allclose(weighted.context[:, :77], plain.context[:, :77])
    # BREAK: CLIP gets two windows, T5 the whole text once
    assert broken.context.shape == (1, 2 * 77 + 16, 96)
    _close(broken.context[:, 154:], joined.context[:, 77:])


def test_max_sequence_length_refused(tiny_sd3_no_t5):  # noqa: F811
    parts = _parts(tiny_sd3_no_t5)
    for bad in (513, 0, -1, 2.5, "256", True):
        with pytest.raises(LdmError, match="max-sequence-length") as err:
            text_encoder_for(parts, max_sequence_length=bad)
        assert "\n" not in str(err.value)
    assert check_max_sequence_length(512) == 512
    with pytest.raises(LdmError, match="CLIP states 80 wide"):  # would be cropped, not padded
        SD3TextEncoder(text_encoder_for(parts).clip, None, width=64)


def test_offline_t5_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from ldm.text.tokenizer import build_t5_tokenizer

    built = build_t5_tokenizer(tmp_path / "tokenizer_3")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tokenizer_3", local_files_only=True)
    assert [loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id] == [0, 1, 2]
    texts = ["a photo of a red cat", "Hello, World!  zq 42", "", "naïve"]
    assert loaded(texts)["input_ids"] == built(texts)["input_ids"]
    ids = loaded(texts)["input_ids"]
    assert all(row[-1] == 1 for row in ids)  # </s> ends every sequence, as T5's
    assert 2 not in ids[1]  # any ASCII text tokenizes without <unk>
    assert ids[2] == [1]
    assert loaded.convert_ids_to_tokens(ids[0][:2]) == ["▁a", "▁photo"]


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no_t5"])
def test_fixture_runs_in_diffusers(t5, tiny_sd3, tiny_sd3_no_t5):  # noqa: F811
    pipe = _diffusers(tiny_sd3 if t5 else tiny_sd3_no_t5, t5)
    assert (pipe.text_encoder_3 is not None) == t5
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.quant_conv is None
    assert pipe.scheduler.config.shift == 3.0
    out = pipe(
        "a red cat", negative_prompt="blurry", num_inference_steps=2, height=32, width=32,
        generator=torch.Generator().manual_seed(0), output_type="np", max_sequence_length=16,
    )  # fmt: skip
    assert out.images.shape == (1, 32, 32, 3)
    assert torch.isfinite(torch.from_numpy(out.images)).all()


def test_ldm_loaders_read_the_three_encoders(both):
    """ldm.formats' text-model loader (safe_load, strict keys) gives the same encodings."""
    from transformers import AutoTokenizer

    from ldm.formats.diffusers_folder import load_text_model, load_tokenizer, read_json

    pipe, parts, has_t5 = both
    folder = Path(pipe.config._name_or_path)
    loaded = {}
    for spec in SD3.text_encoders:
        if spec.kind == "t5" and not has_t5:
            continue
        where = folder / spec.subfolder
        loaded[spec.subfolder] = load_text_model(where, read_json(where / "config.json"), "cpu",
                                                 torch.float32)  # fmt: skip
        tokenizer_dir = folder / spec.tokenizer
        loaded[spec.tokenizer] = (
            AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
            if spec.kind == "t5"
            else load_tokenizer(tokenizer_dir)  # ldm's ClipTokenizer
        )
    ours = ModelParts(unet=parts.unet, vae=None, scheduler_config={}, family=SD3, **loaded)
    with torch.no_grad():
        a, b = text_encoder_for(ours).encode(PROMPTS), text_encoder_for(parts).encode(PROMPTS)
    _close(a.context, b.context)
    _close(a.pooled, b.pooled)


def test_exclamation_mark_stays_a_token_for_clip_g(tiny_sd3):  # noqa: F811
    """Both CLIPs read the same BPE tokens (Stability's SD3 code, A1111, ComfyUI): a "!" in
    the prompt stays BPE token 256 for CLIP-G, where transformers' CLIP-G tokenizer, whose pad
    token is "!", reads it as padding (id 0) and so does diffusers."""
    encoder = text_encoder_for(_parts(tiny_sd3))
    ids = encoder.clip.input_ids(["blue sky!"])[0].tolist()
    assert ids[:5] == [49406, 1746, 2390, 256, 49407]


def test_clip_skip_counts_as_a1111(both):
    """ldm's clip skip 2 (A1111) = diffusers' clip_skip 1: one layer before the penultimate."""
    pipe, parts, _ = both
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False, clip_skip=1
        )
        cond = text_encoder_for(parts, clip_skip=2).encode(PROMPTS)
    _close(cond.context, context)
    _close(cond.pooled, pooled)


def test_emphasis_with_a_sentencepiece_style_t5_tokenizer(tiny_sd3):  # noqa: F811
    """A T5 tokenizer.json converted from SentencePiece splits on "▁" only (no WhitespaceSplit):
    "a " alone would give a stray "▁" token; runs are stripped, so T5 still reads "a red cat"."""
    import copy
    from dataclasses import replace

    from tokenizers import pre_tokenizers

    parts = _parts(tiny_sd3)
    tokenizer = copy.deepcopy(parts.tokenizer_3)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    assert len(tokenizer("a ", add_special_tokens=False).input_ids) == 2  # "▁a", "▁"
    encoder = text_encoder_for(replace(parts, tokenizer_3=tokenizer), max_sequence_length=16)
    with torch.no_grad():
        plain = encoder.encode(["a red cat"])
        weighted = encode_prompts(encoder, ["a (red:1.5) cat"])
    weights = torch.ones(16)
    weights[1] = 1.5
    _close(weighted.context[:, 77:], emphasize(plain.context[0, 77:], weights)[None])


def test_no_t5_width_is_the_networks_text_width():
    from ldm.text.encoders import _joint_attention_dim

    assert _joint_attention_dim(SimpleNamespace(config={"joint_attention_dim": 96})) == 96
    assert (
        _joint_attention_dim(SimpleNamespace(config=SimpleNamespace(joint_attention_dim=64))) == 64
    )
    assert _joint_attention_dim(SimpleNamespace()) == 4096  # SD3's T5-XXL width
