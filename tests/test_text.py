"""Text encoders: ldm's offline CLIP tokenizer, and CLIP / OpenCLIP / T5 encoders against their
reference implementations (diffusers' encode_prompt, open_clip's own forward, transformers' T5)."""

import copy

import pytest
import torch

from ldm.errors import CheckpointError, LdmError
from ldm.formats.diffusers_folder import load_text_encoder
from ldm.text.encoders import CLIPTextEncoder, OpenCLIPTextEncoder, T5TextEncoder

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "Hello, World!  Multiple   spaces\tand\nnewlines",
    "(masterpiece:1.2), best quality, 8k uhd, f/1.8 lens",
    "café naïve résumé — 日本語 emoji 🐱 ÀB\u00a0nbsp",
    "don't can't it's 1234567 3.14159 #hashtag @user",
    "word " * 100,  # longer than 77: open_clip truncates, keeps EOT last
]


@pytest.fixture(scope="module")
def clip_tokenizer():
    from ldm.text.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


def test_offline_tokenizer_matches_open_clip(clip_tokenizer):
    import open_clip

    ours = clip_tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True)
    ids = torch.tensor(ours["input_ids"])
    ref = open_clip.tokenize(PROMPTS)  # (B, 77), padded with 0
    for i, prompt in enumerate(PROMPTS):
        n = int((ref[i] != 0).sum())
        assert ids[i, :n].tolist() == ref[i, :n].tolist(), prompt
        assert (ids[i, n:] == clip_tokenizer.pad_token_id).all()
    # and without special tokens, fragment by fragment, as prompt chunking uses it
    sim = open_clip.tokenizer.SimpleTokenizer()
    plain = clip_tokenizer(PROMPTS, add_special_tokens=False, verbose=False)["input_ids"]
    assert plain == [sim.encode(p) for p in PROMPTS]


# open_clip (like OpenAI's CLIP) first runs ftfy.fix_text and html.unescape; transformers 5's
# CLIPTokenizer does neither, ldm's ClipTokenizer adds that step.
@pytest.mark.parametrize("text", ["“curly quotes”", "&amp; &lt;tag&gt;", "ﬁne", "Ａｂｃ"])
def test_offline_tokenizer_ftfy_cases(clip_tokenizer, text):
    from open_clip.tokenizer import SimpleTokenizer

    ours = clip_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours == SimpleTokenizer().encode(text)


@pytest.fixture(scope="module")
def sd1_pipe(tiny_sd1):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    # diffusers 0.42's clip_skip path reads text_encoder.text_model.final_layer_norm, which
    # transformers 5 flattened away; alias it (outside nn.Module registration) so diffusers runs.
    if not hasattr(pipe.text_encoder, "text_model"):
        object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)
    return pipe


@pytest.mark.parametrize("clip_skip, diffusers_skip", [(1, None), (2, 1), (3, 2)])
def test_clip_matches_diffusers_encode_prompt(sd1_pipe, clip_skip, diffusers_skip):
    prompts = ["a red cube on a table", "a blue sphere, in the sky, photo"]
    encoder = CLIPTextEncoder(sd1_pipe.text_encoder, sd1_pipe.tokenizer, clip_skip=clip_skip)
    with torch.no_grad():
        cond = encoder.encode(prompts)
        ref, _ = sd1_pipe.encode_prompt(prompts, "cpu", 1, False, clip_skip=diffusers_skip)
    assert cond.context.shape == (2, 77, 32)
    torch.testing.assert_close(cond.context, ref, rtol=0, atol=1e-6)
    assert cond.mask.shape == (2, 77) and cond.mask.all()
    # pooled = last layer at the EOS token, whatever the clip skip
    with torch.no_grad():
        out = sd1_pipe.text_encoder(encoder.input_ids(prompts))
    torch.testing.assert_close(cond.pooled, out.pooler_output)
    if clip_skip > 1:
        assert not torch.allclose(cond.context, out.last_hidden_state)


def test_clip_skip_out_of_range(sd1_pipe):
    with pytest.raises(LdmError, match="clip-skip 4"):
        CLIPTextEncoder(sd1_pipe.text_encoder, sd1_pipe.tokenizer, clip_skip=4)  # 3 layers


def test_load_text_encoder(tiny_sd1, sd1_pipe, tmp_path):
    encoder = load_text_encoder(tiny_sd1, clip_skip=2)
    reference = CLIPTextEncoder(sd1_pipe.text_encoder, sd1_pipe.tokenizer, clip_skip=2)
    with torch.no_grad():
        a, b = encoder.encode(["a cat"]), reference.encode(["a cat"])
    for name in ("context", "pooled", "mask"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name))
    with pytest.raises(CheckpointError, match="text_encoder"):
        load_text_encoder(tmp_path)


def _tiny_open_clip():
    from open_clip.model import CLIPTextCfg, _build_text_tower

    torch.manual_seed(0)
    cfg = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4, layers=2)
    return _build_text_tower(embed_dim=16, text_cfg=cfg).eval()


def test_open_clip_layers_match_open_clip_forward(clip_tokenizer):
    tower = _tiny_open_clip()
    import open_clip

    prompts = ["a castle on a hill", "two cats, sleeping"]
    last = OpenCLIPTextEncoder(tower, layer_idx=0)
    penultimate = OpenCLIPTextEncoder(tower)  # SD 2.x: layer "penultimate"
    assert (penultimate.bos_token_id, penultimate.eos_token_id) == (49406, 49407)
    ids = penultimate.input_ids(prompts)
    torch.testing.assert_close(ids, open_clip.tokenize(prompts))  # same ids, 0-padded
    ours = OpenCLIPTextEncoder(tower, clip_tokenizer)  # ldm's offline tokenizer works too
    torch.testing.assert_close(ours.input_ids(prompts), ids)

    # reference: open_clip's own forward, on the full tower and on a copy without its last block
    tower.output_tokens = True
    cut = copy.deepcopy(tower)
    cut.transformer.resblocks = cut.transformer.resblocks[:-1]
    with torch.no_grad():
        pooled_ref, tokens_ref = tower(ids)
        _, tokens_cut = cut(ids)
        a, b = last.encode(prompts), penultimate.encode(prompts)
    torch.testing.assert_close(a.context, tokens_ref)
    torch.testing.assert_close(b.context, tokens_cut)
    torch.testing.assert_close(a.pooled, pooled_ref)
    torch.testing.assert_close(b.pooled, pooled_ref)
    assert b.context.shape == (2, 77, 32) and b.mask.all()


@pytest.fixture(scope="module")
def tiny_t5():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = "a an the cat dog red blue on table sky photo of , .".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return T5EncoderModel(config).eval(), tokenizer


def test_t5_encoder(tiny_t5):
    model, tokenizer = tiny_t5
    encoder = T5TextEncoder(model, tokenizer)
    prompts = ["a red cat on the table", "blue sky"]
    with torch.no_grad():
        cond = encoder.encode(prompts)
        # reference: the tokenizer's own padding and attention mask straight into transformers
        ref_in = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
        ref = model(**ref_in).last_hidden_state
        alone = model(tokenizer(prompts[1:], return_tensors="pt").input_ids).last_hidden_state
    assert cond.context.shape == (2, 77, 32)
    torch.testing.assert_close(cond.mask, ref_in.attention_mask.bool())
    assert cond.mask.sum(1).tolist() == [7, 3]  # words + </s>
    torch.testing.assert_close(cond.context, ref)
    # padding is masked: the real tokens equal an unpadded run
    torch.testing.assert_close(cond.context[1, :3], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.pooled[1], alone[0].mean(0), atol=1e-5, rtol=1e-5)


def test_load_t5_encoder_from_folder(tiny_t5, tmp_path):
    """A T5 encoder saved by transformers (tied embedding stored once) loads through safe_load."""
    model, tokenizer = tiny_t5
    model.save_pretrained(tmp_path / "text_encoder_3")
    tokenizer.save_pretrained(tmp_path / "tokenizer_3")
    loaded = load_text_encoder(
        tmp_path, "t5", subfolder="text_encoder_3", tokenizer_subfolder="tokenizer_3"
    )
    reference = T5TextEncoder(model, tokenizer)
    with torch.no_grad():
        a, b = loaded.encode(["a red cat"]), reference.encode(["a red cat"])
    torch.testing.assert_close(a.context, b.context)
    torch.testing.assert_close(a.mask, b.mask)
