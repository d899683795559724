"""Prompt files -> jobs: plain text (A1111 "prompts from file"), JSONL or CSV; seeds and sweeps.

Formats, chosen by suffix (``.jsonl``/``.ndjson``, ``.csv``, anything else is text):

- text: one prompt per line; blank lines and lines starting with ``#`` are skipped; a line that
  starts with ``--`` is read like a shell command line, as A1111's "prompts from file" script does
  (``--prompt "a cat" --seed 5 --steps 30 --cfg_scale 7 --sampler_name "Euler a"``).
- JSONL: one object per line with any txt2img parameter (``null`` = the default).
- CSV: a header row of parameter names, one job per row (an empty cell = the default).

Every entry expands to ``n_iter x batch_size`` (or ``--n-per-prompt``) images with seeds s, s+1,
... (or the ``--seeds`` list), times the cross product of the ``--sweep`` values (A1111's X/Y
plot). Files are streamed line by line, so a million-line file is validated in constant memory;
problems come back as :class:`Invalid` records carrying their line number.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ldm.errors import LdmError
from ldm.request import check_sampler, check_shift
from ldm.sampling.plan import is_flow

# parameter -> type; every txt2img parameter a job may set
PARAMS: dict[str, type] = {
    "prompt": str, "negative_prompt": str, "seed": int, "steps": int, "guidance_scale": float,
    "guidance_rescale": float, "sampler": str, "schedule": str, "eta": float, "height": int,
    "width": int, "clip_skip": int, "init_image": str, "mask": str, "strength": float,
    "n_iter": int, "batch_size": int,
    "shift": float,  # flow models (SD3): the static time shift; absent = the checkpoint's
    "true_cfg_scale": float,  # FLUX.1-dev: CFG over its embedded guidance; absent = off
}  # fmt: skip
# A1111 / CompVis spellings -> ours
ALIASES = {
    "cfg_scale": "guidance_scale", "scale": "guidance_scale", "sampler_name": "sampler",
    "scheduler": "schedule", "schedule_type": "schedule", "h": "height", "w": "width",
    "negative": "negative_prompt", "text": "prompt", "caption": "prompt",
    "n_per_prompt": "n_iter", "n_samples": "batch_size", "denoising_strength": "strength",
}  # fmt: skip
SWEEPABLE = set(PARAMS) - {"prompt", "seed", "n_iter", "batch_size"}
MAX_LINE_BYTES = 1 << 20  # longer lines are reported, never loaded
MAX_PROMPT_CHARS = 20_000  # ~70 CLIP chunks; more would only exhaust memory
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Job:
    """One image to make: its parameters and where it came from."""

    index: int  # position in the run: names the file, decides the batch and the shard
    line: int  # line of the prompt file (1-based; CSV: the row's first line)
    entry: int  # which valid entry (line/row/object) of the file, from 0; one grid per entry
    params: dict  # resolved txt2img parameters, seed included
    axes: tuple = ()  # ((key, value), ...) of the sweeps, for grid labels


@dataclass(frozen=True)
class Invalid:
    """An entry that cannot become jobs, and why."""

    line: int
    message: str


@dataclass
class JobSpec:
    """Everything besides the file that decides the jobs (flags of ``ldm batch``)."""

    defaults: dict = field(default_factory=dict)  # txt2img parameters given as flags
    seeds: list[int] | None = None  # --seeds: these seeds for every entry without its own
    n_per_prompt: int | None = None  # --n-per-prompt: images per entry (seeds s, s+1, ...)
    sweeps: list[tuple[str, list]] = field(default_factory=list)  # --sweep key=v1,v2
    factor: int = 8  # sizes must be multiples of the VAE's latent factor
    # the model's scheduler config: whether a job may set a shift (ldm.request.check_shift)
    scheduler_config: dict = field(default_factory=dict)
    default_size: tuple[int, int] = (512, 512)  # (height, width) when a job sets none
    max_size: int = 4096  # pixels per side; bigger would only exhaust memory


# ---- values ---------------------------------------------------------------------------------
def canonical_key(key: str) -> str:
    """``--cfg_scale``, ``cfg-scale``, ``CFG scale`` -> ``guidance_scale``."""
    key = key.strip().lstrip("-").lower().replace("-", "_").replace(" ", "_")
    return ALIASES.get(key, key)


def convert(key: str, value):
    """Convert a text or JSON value to the parameter's type; ValueError says what is wrong."""
    kind = PARAMS[key]
    if value is None or (key == "eta" and str(value).lower() in ("none", "")):
        return None
    if isinstance(value, bool) or (kind is str and not isinstance(value, str)):
        raise ValueError(f"{key} {value!r} is not a {kind.__name__}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{key} {value!r} is not an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} {value!r} is not an integer") from None
    if kind is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} {value!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        return number
    return value


def parse_sweep(text: str) -> tuple[str, list]:
    """``guidance_scale=5,7.5`` -> ("guidance_scale", [5.0, 7.5])."""
    key, sep, values = text.partition("=")
    key = canonical_key(key)
    if not sep or not values.strip():
        raise LdmError(f"--sweep {text!r}: expected KEY=V1,V2,...")
    if key not in SWEEPABLE:
        hint = " (use --seeds for seeds)" if key == "seed" else ""
        raise LdmError(f"--sweep {text!r}: cannot sweep {key!r}{hint}; one of {sorted(SWEEPABLE)}")
    try:
        return key, [convert(key, v.strip()) for v in values.split(",")]
    except ValueError as e:
        raise LdmError(f"--sweep {text!r}: {e}") from None


def parse_seeds(text: str) -> list[int]:
    """``1,2,3`` -> [1, 2, 3]."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise LdmError(f"--seeds {text!r}: expected integers separated by commas") from None
    if any(not 0 <= s <= MAX_SEED for s in seeds):
        raise LdmError(f"--seeds {text!r}: seeds must be between 0 and 2**63-1")
    return seeds


# ---- reading the file, one entry at a time -----------------------------------------------------
def _lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text or None, problem or None), bounded memory even for one huge line."""
    with open(path, "rb") as f:
        number = 0
        while raw := f.readline(MAX_LINE_BYTES):
            number += 1
            if not raw.endswith(b"\n") and len(raw) == MAX_LINE_BYTES:
                while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass  # skip the rest of the over-long line
                yield number, None, f"line longer than {MAX_LINE_BYTES} bytes"
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, None, f"not valid UTF-8 (byte {raw[e.start]:#04x} at {e.start})"
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")  # a BOM from Windows editors
            yield number, text.rstrip("\r\n"), None


def _text_entries(path: Path) -> Iterator[tuple[int, dict | str]]:
    """(line, options dict) per prompt line, or (line, problem string)."""
    for number, text, problem in _lines(path):
        if problem:
            yield number, problem
        elif text.strip() and not text.lstrip().startswith("#"):
            command = text.lstrip().startswith("--")
            yield number, _command_line(text) if command else {"prompt": text.strip()}


def _command_line(text: str) -> dict | str:
    """A1111's ``--key value --key "quoted value"`` line -> dict (or a problem string)."""
    try:
        tokens = shlex.split(text)
    except ValueError as e:
        return f"cannot parse the options ({e})"
    options = {}
    for i in range(0, len(tokens), 2):
        if not tokens[i].startswith("--"):
            return f"expected an option starting with --, got {tokens[i]!r}"
        if i + 1 >= len(tokens):
            return f"option {tokens[i]} has no value"
        options[tokens[i]] = tokens[i + 1]
    return options


def _jsonl_entries(path: Path) -> Iterator[tuple[int, dict | str]]:
    for number, text, problem in _lines(path):
        if problem or not text.strip():
            if problem:
                yield number, problem
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield number, f"not valid JSON ({e.msg} at column {e.colno})"
            continue
        yield number, obj if isinstance(obj, dict) else "expected a JSON object per line"


def _csv_entries(path: Path) -> Iterator[tuple[int, dict | str]]:
    problems: dict[int, str] = {}

    def texts():
        for number, text, problem in _lines(path):
            if problem:
                problems[number] = problem
            yield (text or "") + "\n"

    reader = csv.reader(texts())
    header, start = None, 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield reader.line_num, f"CSV: {e}"
            start = reader.line_num + 1
            continue
        bad = [problems[n] for n in range(start, reader.line_num + 1) if n in problems]
        line, start = start, reader.line_num + 1
        if header is None:
            if bad:
                raise LdmError(f"{path}:{line}: header: {bad[0]}")
            header = [canonical_key(h) for h in row]
            unknown = [h for h in header if h not in PARAMS]
            if unknown:
                raise LdmError(f"{path}:{line}: unknown CSV column(s) {unknown}; known: "
                               f"{', '.join(PARAMS)}")  # fmt: skip
        elif bad:
            yield line, bad[0]
        elif any(cell.strip() for cell in row):
            if len(row) != len(header):
                yield line, f"{len(row)} cells but the header has {len(header)} columns"
            else:
                yield line, {k: v for k, v in zip(header, row) if v != ""}


def read_entries(path: str | Path) -> Iterator[tuple[int, dict | str]]:
    """(line, raw options) for each entry of a prompt file, or (line, problem)."""
    path = Path(path)
    if not path.is_file():
        raise LdmError(f"--prompts {path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_entries(path)
    if suffix == ".csv":
        return _csv_entries(path)
    return _text_entries(path)


# ---- entries -> validated jobs ------------------------------------------------------------------
# the defaults of ``ldm txt2img``, except the seed: a resumable run needs a fixed one
BASE = dict(
    negative_prompt="", seed=0, steps=20, guidance_scale=7.5, guidance_rescale=0.0,
    sampler="dpmpp_2m", schedule="default", eta=None, height=None, width=None, clip_skip=1,
    init_image=None, mask=None, strength=0.8,
)  # fmt: skip
MAX_STEPS = 1000
MAX_IMAGES_PER_ENTRY = 10_000


def iter_jobs(path: str | Path, spec: JobSpec) -> Iterator[Job | Invalid]:
    """Stream the jobs of a prompt file in run order; an invalid entry yields one Invalid.

    An entry is all or nothing: either every image it expands to is valid, or none is made.
    Job indices count valid jobs only, so the same file and flags always give the same names.
    """
    index = entry = 0
    keys = [key for key, _ in spec.sweeps]
    combos = list(itertools.product(*[values for _, values in spec.sweeps]))
    for line, raw in read_entries(path):
        if isinstance(raw, str):
            yield Invalid(line, raw)
            continue
        try:
            params, count = _entry_params(raw, spec)
            seeds = _entry_seeds(params, count, raw, spec)
            expanded = []
            for combo in combos:
                swept = _check(dict(params, **dict(zip(keys, combo))), spec)
                expanded += [(dict(swept, seed=s), tuple(zip(keys, combo))) for s in seeds]
        except (ValueError, LdmError) as e:
            yield Invalid(line, str(e))
            continue
        for params_i, axes in expanded:
            yield Job(index, line, entry, params_i, axes)
            index += 1
        entry += 1


def _entry_params(raw: dict, spec: JobSpec) -> tuple[dict, int]:
    """Flags, then the entry's own options (converted); returns (params, images per seed list)."""
    params = dict(BASE)
    params.update({k: v for k, v in spec.defaults.items() if v is not None})
    own = {}
    for key, value in raw.items():
        name = canonical_key(str(key))
        if name not in PARAMS:
            raise ValueError(f"unknown option {key!r}; known: {', '.join(PARAMS)}")
        if name in own:
            raise ValueError(f"option {key!r} given twice")
        own[name] = convert(name, value)
    params.update({k: v for k, v in own.items() if v is not None or k == "eta"})
    if not isinstance(params.get("prompt"), str):
        raise ValueError("no prompt")
    if (
        len(params["prompt"]) > MAX_PROMPT_CHARS
        or len(params["negative_prompt"]) > MAX_PROMPT_CHARS
    ):
        raise ValueError(f"prompt longer than {MAX_PROMPT_CHARS} characters")
    n_iter, batch = params.pop("n_iter", None), params.pop("batch_size", None)
    if n_iter is None and batch is None:
        count = spec.n_per_prompt or 1
    else:
        count = (n_iter or 1) * (batch or 1)
    if not 1 <= count <= MAX_IMAGES_PER_ENTRY:
        raise ValueError(f"n_iter x batch_size must be between 1 and {MAX_IMAGES_PER_ENTRY}")
    return params, count


def _entry_seeds(params: dict, count: int, raw: dict, spec: JobSpec) -> list[int]:
    own_seed = any(canonical_key(str(k)) == "seed" and v is not None for k, v in raw.items())
    if spec.seeds and not own_seed:
        seeds = list(spec.seeds)
    else:
        seeds = [params["seed"] + k for k in range(count)]
    if any(not 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"seed {params['seed']} must be between 0 and 2**63-1 (-1 = random "
                         "cannot be resumed)")  # fmt: skip
    return seeds


def _check(p: dict, spec: JobSpec) -> dict:
    """Validate one job's parameters and resolve names (A1111 sampler aliases, default size)."""
    sampler, schedule = check_sampler(p["sampler"], p["schedule"])
    p = dict(p, sampler=sampler.name, schedule=schedule)
    if not 1 <= p["steps"] <= MAX_STEPS:
        raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {p['steps']}")
    if not 0.0 <= p["guidance_rescale"] <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {p['guidance_rescale']}")
    if p["eta"] is not None and p["eta"] < 0:
        raise ValueError(f"eta must be >= 0, got {p['eta']}")
    if p["clip_skip"] < 1:
        raise ValueError(f"clip_skip must be >= 1, got {p['clip_skip']}")
    if not 0.0 < p["strength"] <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {p['strength']}")
    if p.get("shift") is not None:  # the pipeline's rule: static-shift flow models only, > 0
        config = spec.scheduler_config
        check_shift(p["shift"], config, flow=is_flow(config))
    for key in ("init_image", "mask"):
        if p[key] is not None and not Path(p[key]).is_file():
            raise ValueError(f"{key} {p[key]}: no such file")
    if p["mask"] is not None and p["init_image"] is None:
        raise ValueError("mask needs init_image")
    if p["init_image"] is None:  # img2img keeps the init image's size, so only txt2img defaults
        p["height"] = spec.default_size[0] if p["height"] is None else p["height"]
        p["width"] = spec.default_size[1] if p["width"] is None else p["width"]
        del p["init_image"], p["mask"], p["strength"]
    for key in ("height", "width"):
        size = p.get(key)
        if size is not None and not (0 < size <= spec.max_size and size % spec.factor == 0):
            raise ValueError(
                f"{key} {size} must be a positive multiple of {spec.factor} (the VAE's latent "
                f"factor) and at most {spec.max_size}"
            )
    return p


def validate(path: str | Path, spec: JobSpec, keep: int = 50) -> tuple[int, list[Invalid], int]:
    """(number of valid jobs, the first ``keep`` invalid entries, number of invalid entries)."""
    num_jobs = num_invalid = 0
    invalid: list[Invalid] = []
    for item in iter_jobs(path, spec):
        if isinstance(item, Invalid):
            num_invalid += 1
            if len(invalid) < keep:
                invalid.append(item)
        else:
            num_jobs += 1
    return num_jobs, invalid, num_invalid
