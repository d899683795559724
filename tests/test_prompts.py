"""A1111 prompt syntax and chunking: golden parses from A1111's own docstring, chunks checked
against the text model run directly on the expected token windows."""

import pytest
import torch

from ldm.text.prompts import (
    encode_cond_uncond,
    encode_prompts,
    pad_to_same_length,
    parse_prompt_attention,
    prompt_chunks,
)

# Golden data: the doctest examples of parse_prompt_attention in AUTOMATIC1111
# stable-diffusion-webui, modules/prompt_parser.py (inputs and outputs copied verbatim).
A1111_DOCSTRING = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]
MORE = [
    ("((word))", [("word", 1.1 * 1.1)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
    ("(word:1.5)", [("word", 1.5)]),
    ("(word: 0.25 )", [("word", 0.25)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("\\(not weighted\\)", [("(not weighted)", 1.0)]),
    ("stray) close] brackets", [("stray) close] brackets", 1.0)]),
    ("[unclosed square", [("unclosed square", 1 / 1.1)]),
    ("a:b (c:d)", [("a:b ", 1.0), ("c:d", 1.1)]),
    ("", [("", 1.0)]),
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
    ("break BREAKING", [("break BREAKING", 1.0)]),  # only the uppercase word
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]),
]


@pytest.mark.parametrize("text, expected", A1111_DOCSTRING + MORE)
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.fixture(scope="module")
def encoder():
    from tiny import TEXT
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.text.encoders import CLIPTextEncoder
    from ldm.text.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**TEXT, hidden_act="quick_gelu")).eval()
    return CLIPTextEncoder(model, build_clip_tokenizer())


def _window(encoder, tokens):
    """Reference: the text model run directly on BOS + tokens + EOS + pad."""
    ids = [49406, *tokens, 49407] + [49407] * (75 - len(tokens))
    with torch.no_grad():
        return encoder.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def assert_cond_equal(a, b, **tolerance):
    """Field by field (context, pooled, mask): assert_close would walk a Cond as a sequence."""
    for name in ("context", "pooled", "mask"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), **tolerance)


WORDS = "red green blue cat dog tree house sky".split()


def _words(n, offset=0):
    return " ".join(WORDS[(i + offset) % len(WORDS)] for i in range(n))


@torch.no_grad()
def test_plain_prompt_equals_encode(encoder):
    prompts = ["a photo of a cat, studio light", _words(75)]
    assert_cond_equal(encode_prompts(encoder, prompts), encoder.encode(prompts), rtol=0, atol=0)


@torch.no_grad()
def test_long_prompt_is_chunked_not_truncated(encoder):
    prompt = _words(100)  # 100 one-token words, no commas
    tokens = encoder.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(tokens) == 100
    cond = encode_prompts(encoder, [prompt])
    assert cond.context.shape == (1, 154, 32) and cond.mask.shape == (1, 154)
    torch.testing.assert_close(cond.context[0, :77], _window(encoder, tokens[:75]))
    torch.testing.assert_close(cond.context[0, 77:], _window(encoder, tokens[75:]))
    # pooled = first chunk's
    torch.testing.assert_close(cond.pooled, encoder.encode([prompt]).pooled)


def test_comma_backtrack(encoder):
    prompt = _words(70) + ", " + _words(10, 3)  # a comma at token 70, chunk full at 75
    comma = encoder.tokenizer(",", add_special_tokens=False)["input_ids"][0]
    first, second = prompt_chunks(encoder, prompt)
    assert len(first[0]) == 71 and first[0][-1] == comma  # broken after the comma
    assert len(second[0]) == 10
    a, b = prompt_chunks(encoder, prompt, comma_backtrack=0)
    assert (len(a[0]), len(b[0])) == (75, 6)
    far = _words(40) + ", " + _words(40)  # comma 34 tokens back: too far, plain split
    assert [len(t) for t, _ in prompt_chunks(encoder, far)] == [75, 6]


@torch.no_grad()
def test_break_starts_a_new_chunk(encoder):
    cond = encode_prompts(encoder, ["a red cat BREAK a blue dog"])
    assert cond.context.shape[1] == 154
    torch.testing.assert_close(cond.context[:, :77], encoder.encode(["a red cat"]).context)
    torch.testing.assert_close(cond.context[:, 77:], encoder.encode(["a blue dog"]).context)


@torch.no_grad()
def test_weights_original_mode(encoder):
    cond = encode_prompts(encoder, ["a (red:1.5) cat [dog]"])
    tokens = encoder.tokenizer("a red cat dog", add_special_tokens=False)["input_ids"]
    z = _window(encoder, tokens)  # (77, 32), same tokens unweighted
    w = torch.ones(77)
    w[2], w[4] = 1.5, 1 / 1.1  # BOS a red cat dog
    expected = z * w[:, None]
    expected = expected * (z.mean() / expected.mean())  # A1111 "Original": keep the mean
    torch.testing.assert_close(cond.context[0], expected)
    torch.testing.assert_close(cond.context.mean(), z.mean())
    assert not torch.allclose(cond.context[0], z)


@torch.no_grad()
def test_cond_and_uncond_padded_to_same_chunks(encoder):
    long = _words(80)
    cond, uncond = encode_cond_uncond(encoder, [long, "a cat"], ["", "ugly"])
    assert cond.context.shape == uncond.context.shape == (2, 154, 32)
    empty = encoder.encode([""]).context[0]
    torch.testing.assert_close(uncond.context[0, :77], empty)
    torch.testing.assert_close(uncond.context[0, 77:], empty)  # padded with empty chunks
    torch.testing.assert_close(cond.context[1, :77], encoder.encode(["a cat"]).context[0])
    torch.testing.assert_close(uncond.context[1, :77], encoder.encode(["ugly"]).context[0])
    # the same result when encoded apart and padded afterwards
    a = encode_prompts(encoder, [long])
    b = encode_prompts(encoder, ["ugly"])
    a2, b2 = pad_to_same_length([a, b], encode_prompts(encoder, [""]))
    torch.testing.assert_close(a2.context, a.context)
    torch.testing.assert_close(b2.context, uncond.context[1:])
    assert b2.mask.shape == (1, 154)
