"""A1111 "infotext": the ``parameters`` text of a PNG, and ldm's JSON record beside it.

Format (AUTOMATIC1111 stable-diffusion-webui, ``modules/processing.py`` writes it and
``modules/infotext_utils.py: parse_generation_parameters`` reads it)::

    <prompt, possibly several lines>
    Negative prompt: <negative prompt, possibly several lines>
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512

The last line is ``Key: value`` pairs separated by ", "; a value containing ``,`` ``:`` or a newline
is written as a JSON string. A1111 omits ``Clip skip`` when it is 1 and ``RNG`` when it is "GPU".
Names come from the sampler table (``ldm.sampling.samplers``), meaning included: A1111 >= 1.9 reads
"Schedule type: Automatic" as the sampler's own schedule (Karras for DPM++ 2M), and so does ldm;
ldm writes it only where A1111 renders ldm's schedule by it (docs/infotext.md has the table).

Our params dict uses ldm's names: prompt, negative_prompt, steps, sampler, schedule (ldm sampler and
schedule names), guidance_scale, seed, width, height, model_hash, model, denoising_strength, eta,
guidance_rescale, clip_skip, rng, version, and ``extra`` ({A1111 label: text} for anything else).
Keys with no place in the line (dtype, device, ...) are ignored here; they live in the JSON record.

Limits of the format, shared with A1111: a prompt line that starts with "Negative prompt:" cannot be
told from the negative prompt, and A1111 (not ldm) strips whitespace around each prompt line.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm import __version__
from ldm.errors import LdmError
from ldm.io import atomic_save
from ldm.sampling.samplers import SPEC, SPECS, resolve_sampler

# ldm sampler name -> A1111 label (A1111 >= 1.9 keeps the schedule in "Schedule type")
SAMPLER_TO_A1111 = {spec.name: spec.a1111 for spec in SPECS}
# ldm schedule -> A1111 "Schedule type" (modules/sd_schedulers.py labels); "default" is written
# per sampler (a1111_sampler_names): "Automatic" only where A1111 renders ldm's schedule for it
SCHEDULE_TO_A1111 = {
    "default": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "beta": "Beta",
}
# a flow model's "default" (diffusers' FlowMatch sigmas, t uniform then shifted): written as
# Forge writes FLUX's default, beside "Schedule spacing: diffusers" (ldm reads back "default")
FLOW_DEFAULT_SCHEDULE = "simple"
SCHEDULE_FROM_A1111 = {v.lower(): k for k, v in SCHEDULE_TO_A1111.items() if k != "default"}
# A1111's "Normal" spaces the same N timesteps from t(sigma_max) to t(sigma_min) as "Uniform"
SCHEDULE_FROM_A1111["normal"] = "uniform"
# ldm's "default" where A1111 has no such schedule: written beside its nearest A1111 schedule
_SPACING, _DIFFUSERS = "Schedule spacing", "diffusers"
_AUTOMATIC = "Automatic"

# (ldm key, A1111 label, parser) in the order A1111 writes them; Sampler and Size are special.
_FIELDS = [
    ("steps", "Steps", int),
    ("guidance_scale", "CFG scale", float),
    ("seed", "Seed", int),
    ("model_hash", "Model hash", str),
    ("model", "Model", str),
    ("denoising_strength", "Denoising strength", float),
    ("eta", "Eta", float),
    ("guidance_rescale", "Guidance rescale", float),
    ("clip_skip", "Clip skip", int),
    ("rng", "RNG", str),
    ("refiner", "Refiner", str),  # SDXL: A1111 writes "name [hash]"
    ("refiner_switch_at", "Refiner switch at", float),
    ("shift", "Shift", float),  # flow models' time shift (Forge, ComfyUI's ModelSamplingSD3)
]
# Forge's label for FLUX.1-dev's embedded guidance scale; its "CFG scale" is then true CFG (1: off)
_DISTILLED = "Distilled CFG Scale"
_LABEL_TO_FIELD = {label: (key, parse) for key, label, parse in _FIELDS if key != "eta"}
# A1111 has two etas: "Eta DDIM" (DDIM, PLMS, UniPC) and "Eta" (k-diffusion samplers with an eta
# argument); each applies to its own samplers only, and each is written only when it is not the
# sampler's default (0 for DDIM, 1 for the ancestral/SDE ones)
_ETA_LABELS = ("Eta", "Eta DDIM")
_REQUIRED = ("prompt", "steps", "sampler", "guidance_scale", "seed", "width", "height")
_NEGATIVE = "Negative prompt:"

# A "Key: value" pair of the last line: a JSON string, or anything up to the next comma.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_LABEL = re.compile(r"\w[\w \-/]+")
_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")
_RE_NAME_HASH = re.compile(r"^(.*) \[([0-9a-f]+)\]$")  # A1111's "name [hash]" of a model


def a1111_sampler_names(sampler: str, schedule: str = "default") -> tuple[str, str]:
    """ldm (sampler, schedule) -> A1111 ("Sampler", "Schedule type") that render alike.

    "Automatic" is written only where A1111 renders ldm's schedule by it (the sampler's
    ``a1111_schedule``); ldm's "default" (diffusers' spacing) elsewhere becomes the nearest A1111
    schedule, and ``format_infotext`` adds "Schedule spacing: diffusers" beside it.
    """
    spec = SPEC.get(sampler)
    if spec is None or schedule not in SCHEDULE_TO_A1111:
        raise LdmError(f"no A1111 name for sampler/schedule {sampler!r}/{schedule!r}")
    if schedule == spec.a1111_schedule:
        return spec.a1111, _AUTOMATIC
    if schedule == "default":
        return spec.a1111, SCHEDULE_TO_A1111[spec.a1111_nearest]
    return spec.a1111, SCHEDULE_TO_A1111[schedule]


def _diffusers_spacing(sampler: str, schedule: str) -> bool:
    """Whether the infotext needs "Schedule spacing: diffusers" to say that ldm used "default"."""
    return schedule == "default" and SPEC[sampler].a1111_schedule != "default"


def ldm_sampler_names(
    sampler: str, schedule_type: str | None = None, spacing: str | None = None
) -> tuple[str, str]:
    """A1111 ("Sampler", "Schedule type") -> ldm (sampler, schedule); names unknown to ldm are kept.

    Old infotexts (A1111 < 1.9) fold the schedule into the sampler: "DPM++ 2M Karras". A missing
    type or "Automatic" means what A1111 >= 1.9 renders for the sampler (Karras for DPM++ 2M,
    Uniform for Euler a); ``spacing`` "diffusers" (ldm's own key) means ldm's "default".
    """
    name = sampler.strip()
    try:
        ldm_sampler, implied = resolve_sampler(name)
    except LdmError:
        ldm_sampler, implied = name, None
    if implied is not None:
        return ldm_sampler, implied
    known = ldm_sampler in SPEC
    if known and (spacing or "").strip().lower() == _DIFFUSERS:
        return ldm_sampler, "default"
    key = (schedule_type or _AUTOMATIC).strip().lower()
    if key == "automatic":
        return ldm_sampler, SPEC[ldm_sampler].a1111_schedule if known else "default"
    return ldm_sampler, SCHEDULE_FROM_A1111.get(key, schedule_type)


def _number(x) -> str:
    """7.0 -> "7", 7.5 -> "7.5": the shortest text that reads back as the same float."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def quote(value) -> str:
    """A value as A1111 writes it: JSON-quoted when a plain reading would change it."""
    text = str(value)
    plain = (
        text != ""  # A1111 fails on an empty plain value and drops the key
        and not any(c in text for c in ",:\n\r")
        and not text.startswith('"')
        and text == text.strip()
    )
    return text if plain else json.dumps(text, ensure_ascii=False)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value.strip()


def format_infotext(params: dict) -> str:
    """The A1111 ``parameters`` text for one image (see the module docstring for the keys)."""
    missing = [k for k in _REQUIRED if params.get(k) is None]
    if missing:
        raise ValueError(f"infotext parameters missing {', '.join(missing)}")
    schedule = params.get("schedule", "default")
    sampler, schedule_type = a1111_sampler_names(params["sampler"], schedule)
    flow_default = bool(params.get("flow")) and schedule == "default"
    if flow_default:  # one label whatever the sampler: Forge's for FLUX (Euler + Simple)
        schedule_type = SCHEDULE_TO_A1111[FLOW_DEFAULT_SCHEDULE]
    pairs = {"Steps": str(int(params["steps"])), "Sampler": sampler, "Schedule type": schedule_type}
    if _diffusers_spacing(params["sampler"], schedule) or flow_default:
        pairs[_SPACING] = _DIFFUSERS
    if params.get("embedded_guidance"):  # FLUX.1-dev, as Forge writes it
        pairs["CFG scale"] = _number(params.get("true_cfg_scale") or 1.0)
        pairs[_DISTILLED] = _number(params["guidance_scale"])
    else:
        pairs["CFG scale"] = _number(params["guidance_scale"])
    pairs["Seed"] = str(int(params["seed"]))
    pairs["Size"] = f"{int(params['width'])}x{int(params['height'])}"
    for key, label, parse in _FIELDS[3:]:
        value = params.get(key)
        if value is None or (key == "clip_skip" and int(value) <= 1):
            continue  # A1111 leaves out Clip skip 1, its default
        if key == "guidance_rescale" and float(value) == 0:
            continue  # off: A1111 has no such key then
        if key == "eta":
            spec = SPEC[params["sampler"]]
            if spec.eta is None or float(value) == spec.eta:
                continue  # A1111 writes an eta only where it applies and is not the default
            label = spec.a1111_eta
        if key == "refiner" and params.get("refiner_hash"):
            value = f"{value} [{params['refiner_hash']}]"
        pairs[label] = _number(value) if parse is float else str(value)
    if any(lora.get("hash") for lora in params.get("loras") or ()):
        pairs["Lora hashes"] = lora_hashes(params["loras"])
    for label, value in (params.get("extra") or {}).items():
        if not _RE_LABEL.fullmatch(label) or label in pairs or label == "Version":
            raise ValueError(f"infotext extra key {label!r} is not a valid or free A1111 label")
        pairs[label] = str(value)
    pairs["Version"] = params.get("version") or f"ldm {__version__}"
    line = ", ".join(f"{label}: {quote(value)}" for label, value in pairs.items())

    prompt, negative = params["prompt"], params.get("negative_prompt") or ""
    head = prompt
    if negative:
        head += ("\n" if prompt else "") + f"{_NEGATIVE} {negative}"
    return f"{head}\n{line}" if head else line


def lora_hashes(loras: list[dict]) -> str:
    """A1111's "Lora hashes": ``name: hash`` of each merged LoRA with a hash, names without ":"
    and "," (extensions-builtin/Lora/extra_networks_lora.py)."""
    names = [(str(x["name"]).replace(":", "").replace(",", ""), x["hash"]) for x in loras]
    return ", ".join(f"{name}: {h}" for name, h in names if h)


def _parse_param_line(line: str) -> dict:
    out: dict = {}
    extra: dict = {}
    names: dict = {}  # Schedule type/spacing, Eta (DDIM): their meaning depends on the sampler
    for label, raw in _RE_PARAM.findall(line):
        value = _unquote(raw)
        try:
            if label == "Sampler":
                out["sampler"] = value
            elif label in ("Schedule type", _SPACING, *_ETA_LABELS):
                names[label] = value
            elif label == "Size" and _RE_SIZE.match(value):
                out["width"], out["height"] = (int(v) for v in _RE_SIZE.match(value).groups())
            elif label == "Version":
                out["version"] = value
            elif label == _DISTILLED:
                out["distilled"] = float(value)
            elif label == "Refiner" and _RE_NAME_HASH.match(value):
                out["refiner"], out["refiner_hash"] = _RE_NAME_HASH.match(value).groups()
            elif label in _LABEL_TO_FIELD:
                key, parse = _LABEL_TO_FIELD[label]
                out[key] = parse(value)
            else:
                extra[label] = value
        except ValueError:
            raise LdmError(f"infotext: {label} {value!r} is not a valid value") from None
    extra.update(_read_sampler(out, names))
    if "distilled" in out:  # Forge: CFG scale is true CFG over the embedded (distilled) scale
        true_cfg = out.pop("guidance_scale", 1.0)
        out["guidance_scale"], out["embedded_guidance"] = out.pop("distilled"), True
        if true_cfg != 1.0:
            out["true_cfg_scale"] = true_cfg
    if extra:
        out["extra"] = extra
    out.setdefault("clip_skip", 1)  # a missing Clip skip means 1 (A1111 does the same)
    return out


def _read_sampler(out: dict, names: dict) -> dict:
    """Sampler, schedule and eta into ``out`` as A1111 reads them; returns what does not apply.

    Of the two etas only the sampler's own counts (A1111 applies "Eta" to Euler a, the SDE
    samplers, ..., "Eta DDIM" to DDIM and UniPC); the other is kept as an unused label.
    """
    spec = None
    if "sampler" in out:
        spacing = names.pop(_SPACING, None)
        out["sampler"], out["schedule"] = ldm_sampler_names(
            out["sampler"], names.pop("Schedule type", None), spacing
        )
        spec = SPEC.get(out["sampler"])
        if spec is None and spacing is not None:
            names[_SPACING] = spacing
    unused = {}
    for label, value in names.items():
        if spec is None or spec.eta is None or label != spec.a1111_eta:
            unused[label] = value
            continue
        try:
            out["eta"] = float(value)
        except ValueError:
            raise LdmError(f"infotext: {label} {value!r} is not a valid value") from None
    return unused


def parse_infotext(text: str) -> dict:
    """Read an A1111 ``parameters`` text into ldm's params dict (inverse of format_infotext)."""
    lines = text.rstrip().split("\n")
    params: dict = {}
    if len(_RE_PARAM.findall(lines[-1])) >= 3:  # A1111's test for "this is the parameter line"
        params = _parse_param_line(lines.pop())
    start = next((i for i, line in enumerate(lines) if line.startswith(_NEGATIVE)), len(lines))
    negative = "\n".join(lines[start:])[len(_NEGATIVE) :]
    return {
        "prompt": "\n".join(lines[:start]),
        "negative_prompt": negative[1:] if negative.startswith(" ") else negative,
        **params,
    }


def model_hash(path: str | Path) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's sha256.

    For a diffusers folder (which A1111 cannot load) ldm hashes its weight files in path order.
    """
    path = Path(path)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:10]


def save_png(image, path: str | Path, infotext: str, record: dict | None = None) -> None:
    """Write ``image`` as PNG with the A1111 ``parameters`` chunk and the JSON record (``ldm``).

    The text goes in a tEXt chunk when it is Latin-1, else in an iTXt chunk (PIL decides, as for
    A1111); the record is ASCII JSON. Written atomically: the file appears complete or not at all.
    """
    info = PngInfo()
    info.add_text("parameters", infotext)
    if record is not None:
        info.add_text("ldm", json.dumps(record, ensure_ascii=True, sort_keys=True))
    atomic_save(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_metadata(path: str | Path) -> tuple[str | None, dict | None]:
    """(infotext, record) stored in an image; None for each that is absent."""
    try:
        with Image.open(path) as image:
            image.load()  # text chunks after the image data are only read here
            text = dict(getattr(image, "text", None) or image.info)
    except (OSError, ValueError, SyntaxError) as e:
        raise LdmError(f"{path}: cannot read image metadata ({e})") from None
    infotext, record = text.get("parameters"), text.get("ldm")
    if record is not None:
        try:
            record = json.loads(record)
        except json.JSONDecodeError as e:
            raise LdmError(f"{path}: the 'ldm' record is not valid JSON ({e})") from None
    return infotext, record


def infotext_from_record(record: dict) -> str:
    """The A1111 ``parameters`` text of a pipeline record (A1111 names where they differ)."""
    params = dict(record, version=f"ldm {record.get('ldm_version', '')}".strip())
    params["denoising_strength"] = record.get("strength")
    return format_infotext(params)
