"""A1111 prompt syntax: emphasis weights, ``BREAK``, and 75-token chunking of long prompts.

Syntax (AUTOMATIC1111 stable-diffusion-webui, ``modules/prompt_parser.py``): ``(text)`` multiplies
the attention weight by 1.1, ``[text]`` divides it by 1.1, ``(text:1.5)`` multiplies it by 1.5;
``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters; brackets left open at the end
still apply to the rest of the prompt; a stray closing bracket is literal text; ``BREAK``
(uppercase, a separate word) ends the current chunk.

Chunking (A1111 ``sd_hijack_clip``): the weighted fragments are tokenized and packed into chunks of
75 tokens (the encoder's ``chunk_length``); when a chunk fills up and its last comma is at most 20
tokens back, the words after the comma move to the next chunk. Each chunk becomes BOS + 75 + EOS
(padded), is encoded on its own, and the chunks are concatenated along the token axis, so nothing
is ever truncated. Weights use A1111's "Original" emphasis: token embeddings are multiplied by
their weights, then rescaled so the chunk's mean equals the unweighted mean.
"""

from __future__ import annotations

import re

import torch

from ldm.text.cond import Cond

BREAK = ("BREAK", -1.0)  # the marker parse_prompt_attention emits (A1111 uses the same pair)

# One token of the emphasis grammar per match; group 1 is the number of a "(text:number)" weight.
# A1111 accepts any run of digits and dots there (and fails on "1.2.3"); we accept only numbers,
# and whitespace around them as later A1111 versions do, so "(a: 1.5 )" works too.
_RE_ATTENTION = re.compile(
    r"""
    \\[()\[\]\\]                        # escaped bracket or backslash: a literal character
    | \\                                # a lone backslash (A1111 drops it)
    | \( | \[                           # openers
    | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)   # ":1.5)" closes a round bracket with a weight
    | \) | \]                           # closers
    | [^\\()\[\]:]+                     # plain text
    | :                                 # a colon that is not a weight
    """,
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND, SQUARE = 1.1, 1 / 1.1


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into (text, weight) runs; ``BREAK`` appears as ("BREAK", -1.0).

    Runs with equal weights are merged; an empty prompt gives [("", 1.0)]. Unlike A1111, a
    ``BREAK`` inside brackets still breaks (A1111 would multiply its marker and then read it as
    the word "BREAK").
    """
    runs: list[list] = []  # [text, weight, is_break]
    round_open: list[int] = []  # index in runs where each open "(" started
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            if not run[2]:
                run[1] *= factor

    for m in _RE_ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0, False])
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            scale_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), SQUARE)
        else:  # plain text, a stray closer, or ":1.5)" with no open bracket
            for i, part in enumerate(_RE_BREAK.split(token)):
                if i > 0:
                    runs.append([BREAK[0], BREAK[1], True])
                runs.append([part, 1.0, False])
    # brackets never closed apply to everything after them
    for start in round_open:
        scale_from(start, ROUND)
    for start in square_open:
        scale_from(start, SQUARE)

    merged: list[list] = []
    for run in runs or [["", 1.0, False]]:
        if merged and not run[2] and not merged[-1][2] and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w, _ in merged]


def prompt_chunks(encoder, prompt: str, comma_backtrack: int = 20) -> list[tuple[list, list]]:
    """Pack a prompt into (tokens, weights) chunks of at most ``encoder.chunk_length`` tokens."""
    size = encoder.chunk_length
    parsed = parse_prompt_attention(prompt)
    texts = [t for t, w in parsed if (t, w) != BREAK]
    token_lists = iter(encoder.tokenize(texts))
    comma = encoder.tokenize([","])[0]
    comma = comma[0] if len(comma) == 1 else None

    chunks: list[tuple[list, list]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1  # position of the last comma in the current chunk

    def close_chunk() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for text, weight in parsed:
        if (text, weight) == BREAK:
            close_chunk()
            continue
        for token in next(token_lists):
            full = len(tokens) == size
            if token == comma:
                last_comma = len(tokens)
            elif (
                full
                and comma_backtrack
                and 0 <= last_comma
                and size - last_comma <= comma_backtrack
            ):
                # move the words after a nearby comma to the next chunk, so a phrase is not
                # split across two encoder windows
                keep = last_comma + 1
                moved = tokens[keep:], weights[keep:]
                tokens, weights = tokens[:keep], weights[:keep]
                close_chunk()
                tokens, weights = moved
            if len(tokens) == size:
                close_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close_chunk()
    return chunks


def emphasize(context: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 "Original" emphasis: scale each token embedding, then restore the original mean."""
    original_mean = context.mean()
    context = context * weights.to(context.dtype).unsqueeze(-1)  # (L, D) * (L, 1)
    ratio = original_mean / context.mean()
    # a mean near 0 makes the ratio explode; then keep the weighted context as it is
    if not torch.isfinite(ratio) or ratio.abs() > 1e3:
        return context
    return context * ratio


def encode_prompts(encoder, prompts: list[str], *, min_chunks: int = 1) -> Cond:
    """Encode A1111-syntax prompts: (B, 77 * chunks, D) context, nothing truncated.

    All prompts of the batch get the same number of chunks (at least ``min_chunks``): shorter
    ones are padded with chunks of the empty prompt, as A1111 pads cond and uncond. Pooled is the
    first chunk's. The weighting mean is taken per prompt and chunk (A1111 takes it over the
    whole batch, so its results depend on the batch; with one prompt they agree). An encoder
    with more than CLIP windows (SD3: then T5's tokens) does it with its own ``encode_prompts``.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    own = getattr(encoder, "encode_prompts", None)
    if own is not None:
        return own(prompts, min_chunks=min_chunks)
    per_prompt = [prompt_chunks(encoder, p) for p in prompts]
    num_chunks = max(min_chunks, max(len(c) for c in per_prompt))
    empty = ([], [])
    rows = [c + [empty] * (num_chunks - len(c)) for c in per_prompt]

    ids = torch.tensor([encoder.wrap(t) for row in rows for t, _ in row], dtype=torch.long)
    out = encoder.encode_ids(ids)  # every chunk of every prompt in one batch
    context = out.context
    flat = [w for row in rows for _, w in row]
    weighted = []
    for i, w in enumerate(flat):
        if any(x != 1.0 for x in w):
            # weights for [BOS] + tokens + [EOS/PAD...]
            start = 0 if encoder.bos_token_id is None else 1
            token_weights = torch.ones(context.shape[1], device=context.device)
            token_weights[start : start + len(w)] = torch.tensor(w)
            # per encoder when several sit side by side (A1111 weights each embedder's output)
            parts = context[i].split(getattr(encoder, "widths", None) or [context.shape[-1]], -1)
            weighted.append(torch.cat([emphasize(p, token_weights) for p in parts], dim=-1))
        else:
            weighted.append(context[i])
    context = torch.stack(weighted)  # (B * n, L, D)

    batch, length = len(prompts), context.shape[1]
    context = context.reshape(batch, num_chunks * length, -1)  # chunks side by side
    mask = None if out.mask is None else out.mask.reshape(batch, num_chunks * length)
    pooled = None if out.pooled is None else out.pooled.reshape(batch, num_chunks, -1)[:, 0]
    return Cond(context, pooled, mask)


def pad_to_same_length(conds: list[Cond], empty: Cond) -> list[Cond]:
    """Append empty-prompt chunks so every Cond has as many tokens as the longest (A1111).

    ``empty`` is one chunk of the empty prompt, e.g. ``encode_prompts(encoder, [""])``.
    """
    length = max(c.context.shape[1] for c in conds)
    chunk = empty.context.shape[1]
    padded = []
    for c in conds:
        missing = length - c.context.shape[1]
        if missing % chunk:
            raise ValueError(f"context of {c.context.shape[1]} tokens is not whole chunks")
        n, batch = missing // chunk, len(c)
        context = torch.cat([c.context, empty.context.expand(batch, -1, -1).repeat(1, n, 1)], 1)
        mask = c.mask
        if mask is not None and empty.mask is not None:
            mask = torch.cat([mask, empty.mask.expand(batch, -1).repeat(1, n)], 1)
        padded.append(Cond(context, c.pooled, mask))
    return padded


def encode_cond_uncond(
    encoder, prompts: list[str], negative_prompts: list[str]
) -> tuple[Cond, Cond]:
    """Encode prompts and negative prompts in one batch so both have the same chunk count."""
    if len(prompts) != len(negative_prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    both = encode_prompts(encoder, list(prompts) + list(negative_prompts))
    return both[: len(prompts)], both[len(prompts) :]
