"""The CLIP tokenizer built offline from the BPE vocabulary that ships inside open_clip_torch.

New models trained here need a CLIP tokenizer, and nothing may be downloaded. OpenAI's CLIP BPE
(49408 tokens: 256 bytes, 256 byte+"</w>", 48894 merges, <|startoftext|>, <|endoftext|>) ships as
``open_clip/bpe_simple_vocab_16e6.txt.gz``; we write it out as the ``vocab.json`` + ``merges.txt``
pair that transformers' ``CLIPTokenizer`` reads, which is the layout of a diffusers ``tokenizer/``.
OpenAI's tokenizer first cleans the text (ftfy.fix_text, html.unescape twice); transformers' does
not, so ``ClipTokenizer`` adds that step (curly quotes, ligatures, full-width letters, entities).
``build_t5_tokenizer`` makes a small T5-style Unigram tokenizer (T5's ids for <pad>, </s>, <unk>)
for tests and tiny models with a T5 encoder (SD3's third encoder).
"""

from __future__ import annotations

import gzip
import html
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import ftfy
from transformers import CLIPTokenizer

from ldm.io import atomic_write_text

NUM_MERGES = 49152 - 256 - 2  # as in OpenAI CLIP's simple_tokenizer


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map (Radford et al. 2019)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary (token -> id) and merge list, from open_clip's packaged file."""
    import open_clip

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clean_text(text: str) -> str:
    """OpenAI CLIP's ``basic_clean``: ftfy's fixes, then HTML entities unescaped twice."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _clean(text):
    if isinstance(text, str):
        return clean_text(text)
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return [clean_text(t) for t in text]
    return text  # pre-tokenized or None: left to transformers


class ClipTokenizer(CLIPTokenizer):
    """transformers' CLIPTokenizer with CLIP's own text cleaning before it (OpenAI's ids).

    Its files are a plain CLIPTokenizer's, and it reports itself as transformers' CLIPTokenizer
    (class name and module): a diffusers pipeline holding it saves ``["transformers",
    "CLIPTokenizer"]`` in model_index.json, which diffusers and transformers load anywhere.
    """

    def __call__(self, text=None, *args, **kwargs):
        return super().__call__(_clean(text), *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        return super().encode(_clean(text), *args, **kwargs)

    def tokenize(self, text, *args, **kwargs):
        return super().tokenize(_clean(text), *args, **kwargs)


ClipTokenizer.__name__ = ClipTokenizer.__qualname__ = CLIPTokenizer.__name__
ClipTokenizer.__module__ = CLIPTokenizer.__module__


def write_clip_tokenizer(
    directory: str | Path, model_max_length: int = 77, pad_token: str = "<|endoftext|>"
) -> Path:
    """Write a transformers ``CLIPTokenizer`` folder (vocab.json, merges.txt, configs).

    ``pad_token``: CLIP pads with its end-of-text token; SDXL's second (OpenCLIP) tokenizer
    pads with "!" (id 0), as OpenCLIP does.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    atomic_write_text(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(directory / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        **special,
    }
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2))
    atomic_write_text(directory / "special_tokens_map.json", json.dumps(special, indent=2))
    return directory


def build_clip_tokenizer(
    directory: str | Path | None = None,
    model_max_length: int = 77,
    pad_token: str = "<|endoftext|>",
):
    """A ``ClipTokenizer`` (a transformers CLIPTokenizer) made offline; written to ``directory``."""
    if directory is not None:
        written = write_clip_tokenizer(directory, model_max_length, pad_token)
        return ClipTokenizer.from_pretrained(str(written))
    with tempfile.TemporaryDirectory() as tmp:
        written = write_clip_tokenizer(tmp, model_max_length, pad_token)
        return ClipTokenizer.from_pretrained(str(written))


# ---- a small T5-style tokenizer, for tests and tiny models --------------------------------------
# T5 (Raffel et al. 2020) tokenizes with a SentencePiece Unigram model: words get a "▁" prefix
# for the space before them; ids 0, 1, 2 are <pad>, </s>, <unk>, and every sequence ends in </s>.
# Real T5 vocabularies (32k pieces) cannot be made offline, but a Unigram vocabulary built from a
# small corpus has the same layout and the same special ids, so code paths are exercised exactly.
T5_SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
T5_CORPUS = (
    "a photo of an astronaut riding a horse on the moon; a red cat and a blue dog sit on the "
    "table. the green ball, the yellow square and two small circles in the sky. best quality, "
    "masterpiece, 8k, portrait of a woman with long hair, painting, landscape at sunset"
)


def t5_vocabulary(corpus: str = T5_CORPUS) -> list[tuple[str, float]]:
    """Unigram (piece, log-probability) list: T5's special tokens, the corpus' words, characters.

    Whole words are scored by their corpus frequency; every printable ASCII character exists
    alone and with the "▁" prefix (at a lower score), so any ASCII text tokenizes without <unk>.
    """
    import math
    import string
    from collections import Counter

    counts = Counter(corpus.replace(",", " ").replace(".", " ").replace(";", " ").split())
    total = sum(counts.values())
    vocab = [(t, 0.0) for t in T5_SPECIAL] + [("▁", -8.0)]
    vocab += [("▁" + w, math.log(n / total)) for w, n in sorted(counts.items())]
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab += [(c, -12.0) for c in chars] + [("▁" + c, -12.5) for c in chars]
    return vocab


def build_t5_tokenizer(
    directory: str | Path | None = None, corpus: str = T5_CORPUS, model_max_length: int = 512
):
    """A transformers T5 tokenizer (``T5TokenizerFast``) made offline; written to ``directory``.

    Saved as ``tokenizer.json`` + ``tokenizer_config.json``, which transformers' T5 tokenizer
    (and so diffusers' SD3 pipeline) loads from a local folder.
    """
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast(
        vocab=t5_vocabulary(corpus), extra_ids=0, model_max_length=model_max_length
    )
    if directory is not None:
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
            tokenizer.save_pretrained(tmp)  # then moved in file by file, each atomically
            directory.mkdir(parents=True, exist_ok=True)
            for f in Path(tmp).iterdir():
                f.replace(directory / f.name)
    return tokenizer
