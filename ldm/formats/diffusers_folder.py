"""ldm's native checkpoint format: the diffusers folder (model_index.json + one folder per part).

Layout (as diffusers' ``StableDiffusionPipeline.save_pretrained`` writes it): ``unet/`` and
``vae/`` hold ``config.json`` + ``diffusion_pytorch_model.safetensors``, ``text_encoder/`` a
transformers ``config.json`` + ``model.safetensors``, ``tokenizer/`` the CLIP BPE files and
``scheduler/scheduler_config.json`` the noise schedule. The U-Net and VAE are built as ldm's own
modules; every weight goes through :mod:`ldm.formats.safe_load`; saving writes a temp folder
beside the target and renames it, so a half-written folder never appears under the real name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from ldm.dtypes import to_dtype
from ldm.errors import CheckpointError, ConfigError, LdmError
from ldm.formats.safe_load import load_into, load_state_dict, save_state_dict, warn_non_finite
from ldm.io import atomic_write_text
from ldm.models import families
from ldm.models.build import TEXT_MODELS, build_network, build_text_encoder, build_vae
from ldm.models.parts import ModelParts
from ldm.text.encoders import CLIPTextEncoder, T5TextEncoder, TextEncoder
from ldm.text.tokenizer import ClipTokenizer

WEIGHT_NAMES = {  # preference order: full-precision safetensors first, pickles last
    "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                  "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "transformers": ("model.safetensors", "model.fp16.safetensors",
                     "pytorch_model.bin", "pytorch_model.fp16.bin"),
}  # fmt: skip
# "_diffusers_version" in what we write: the oldest diffusers whose folder layout this is
DIFFUSERS_FORMAT_VERSION = "0.32.0"
DEFAULT_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def load_folder(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    prediction_type: str | None = None,
    t5: bool = True,  # False: an SD3 folder's T5-XXL stays unread (zeros in its place)
) -> ModelParts:
    """Load a diffusers Stable Diffusion folder into ldm's modules (weights via safe_load)."""
    path, dtype = Path(path), to_dtype(dtype, "dtype")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a diffusers folder (no such directory)")
    index_path = path / "model_index.json"
    model_index = read_json(index_path) if index_path.exists() else dict(DEFAULT_MODEL_INDEX)
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json")
    if prediction_type is not None:
        scheduler_config["prediction_type"] = normalize_prediction_type(prediction_type)
    text_config_path = path / "text_encoder" / "config.json"
    text_config = read_json(text_config_path) if text_config_path.exists() else None
    family = families.from_folder(model_index, text_config, str(path))
    where = path / family.network_folder  # unet/, or transformer/ (SD3, FLUX)
    unet_config, vae_config = read_json(where / "config.json"), read_json(path / "vae/config.json")
    family = family.for_network(unet_config)  # FLUX.1-schnell: no guidance_embeds
    if not t5 and any(s.kind == "t5" and not s.optional for s in family.text_encoders):
        raise LdmError(f"{path}: {family.label} needs its T5 encoder (its context is T5's); "
                       "--no-t5 is for SD3")  # fmt: skip
    unet = build_network(unet_config, where, family=family.name, empty=True)
    load_weights(unet, load_part(where, "diffusers", dtype), str(where), device, dtype)
    vae = build_vae(vae_config, path / "vae", empty=True)
    vae_state = fix_vae_keys(load_part(path / "vae", "diffusers", dtype))
    load_weights(vae, vae_state, str(path / "vae"), device, dtype)
    text = {}  # SDXL: text_encoder_2/ and tokenizer_2/ too; SD3: text_encoder_3/ (optional)
    for spec in family.text_encoders:
        folder = path / spec.subfolder
        if spec.optional and not (t5 and _listed(model_index, spec.subfolder, folder)):
            continue  # SD3 without T5: zeros in its place (ldm.text.sd3)
        config = read_json(folder / "config.json")
        text[spec.subfolder] = load_text_model(folder, config, device, dtype)
        text[spec.tokenizer] = load_tokenizer(path / spec.tokenizer, spec.kind)
    return ModelParts(
        unet, vae, text.pop("text_encoder", None), text.pop("tokenizer", None), scheduler_config,
        model_index, path, path.name, family=family, **text,
    )  # fmt: skip


def _listed(model_index: dict, name: str, folder: Path) -> bool:
    """A component the folder has: listed with a class in model_index.json and present."""
    entry = model_index.get(name)
    return folder.is_dir() and not (isinstance(entry, list) and entry[:1] == [None])


def load_weights(
    module: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str,
    device: str | torch.device,
    dtype: torch.dtype,
) -> None:
    """Give an empty module its weights, cast tensor by tensor (never two full copies at once).

    NaN/Inf are looked for after the cast, which has to read every weight anyway.
    """
    for name in list(state_dict):
        t = state_dict.pop(name)  # the file's copy is freed as soon as it is cast
        state_dict[name] = t.to(device, dtype) if t.is_floating_point() else t.to(device)
    warn_non_finite(state_dict, source)
    load_into(module, state_dict, source, assign=True)
    module.eval().requires_grad_(False)


def load_part(folder: Path, kind: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict of one component folder: first weight file found, or a sharded index.

    ``dtype``: floating weights are cast as they are read (``load_weights`` checks them).
    """
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: missing component folder")
    for name in WEIGHT_NAMES[kind]:
        if (folder / name).is_file():
            return load_state_dict(folder / name, check_finite=False, dtype=dtype)
        index = folder / f"{name}.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map", {})
            state_dict = {}
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard:
                    raise CheckpointError(f"{index}: shard name {shard!r} leaves the folder")
                state_dict.update(load_state_dict(folder / shard, False, dtype))
            return state_dict
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_NAMES[kind])})")


def fix_vae_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers VAE attention names (query/key/value/proj_attn) -> current (to_q/...)."""
    renames = {
        ".query.": ".to_q.",
        ".key.": ".to_k.",
        ".value.": ".to_v.",
        ".proj_attn.": ".to_out.0.",
    }
    out = {}
    for name, t in state_dict.items():
        for old, new in renames.items():
            name = name.replace(old, new)
        out[name] = t
    return out


def fit_clip_keys(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict:
    """Match ``text_model.``-prefixed keys to the model's naming (transformers >= 5 drops it)."""
    wants_prefix = any(k.startswith("text_model.") for k in model.state_dict())
    out = {}
    for name, t in state_dict.items():
        if name.endswith("position_ids"):
            continue  # a buffer older transformers versions saved; recomputed, never learned
        bare = name.removeprefix("text_model.")
        out[f"text_model.{bare}" if wants_prefix and bare != "text_projection.weight" else bare] = t
    return out


def load_text_model(
    folder: Path, config: dict, device: str | torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """A transformers text model (CLIP or T5 encoder) and its weights from a component folder."""
    arch = (config.get("architectures") or ["CLIPTextModel"])[0]
    if arch not in TEXT_MODELS:
        raise CheckpointError(
            f"{folder}: text encoder {arch} is not supported ({', '.join(TEXT_MODELS)})"
        )
    keep = {k: v for k, v in config.items() if not k.startswith("_")}
    model = build_text_encoder(keep, arch, empty=True)
    state_dict = load_part(folder, "transformers", dtype)
    if arch.startswith("CLIPTextModel"):
        state_dict = fit_clip_keys(state_dict, model)
    elif "shared.weight" in state_dict:  # T5 ties its token embedding; files keep one copy
        state_dict.setdefault("encoder.embed_tokens.weight", state_dict["shared.weight"])
    load_weights(model, state_dict, str(folder), device, dtype)
    return model


def load_text_encoder(
    folder: str | os.PathLike,
    kind: str = "clip",
    *,
    clip_skip: int = 1,
    subfolder: str = "text_encoder",
    tokenizer_subfolder: str = "tokenizer",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> TextEncoder:
    """One text encoder of a diffusers folder, with its tokenizer, ready to ``encode`` prompts."""
    if kind not in ("clip", "t5"):
        raise LdmError(f"text encoder kind {kind!r}: expected 'clip' or 't5'")
    folder = Path(folder)
    model_dir, tok_dir = folder / subfolder, folder / tokenizer_subfolder
    for d in (model_dir, tok_dir):
        if not d.is_dir():
            raise CheckpointError(f"{d}: missing text encoder/tokenizer folder")
    model = load_text_model(model_dir, read_json(model_dir / "config.json"), device, dtype)
    if kind == "clip":
        return CLIPTextEncoder(model, load_tokenizer(tok_dir), clip_skip=clip_skip)
    return T5TextEncoder(model, AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True))


def load_tokenizer(folder: Path, kind: str = "clip") -> Any:
    """A component's tokenizer: ldm's CLIP tokenizer, or transformers' for a T5 (SD3)."""
    if kind == "t5":
        if not any((folder / n).is_file() for n in ("tokenizer.json", "spiece.model")):
            raise CheckpointError(f"{folder}: missing T5 tokenizer (tokenizer.json, spiece.model)")
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    has_fast = (folder / "tokenizer.json").is_file()
    if not has_fast and not all((folder / n).is_file() for n in ("vocab.json", "merges.txt")):
        raise CheckpointError(
            f"{folder}: missing tokenizer (tokenizer.json or vocab.json+merges.txt)"
        )
    return ClipTokenizer.from_pretrained(str(folder), local_files_only=True)


def normalize_prediction_type(value: str) -> str:
    """``eps``/``epsilon``, ``v``/``v_prediction``, ``sample`` -> the diffusers spelling."""
    names = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction",
             "v_prediction": "v_prediction", "sample": "sample", "x0": "sample"}  # fmt: skip
    if value not in names:
        raise ConfigError(f"prediction type {value!r} is not one of eps, v, sample")
    return names[value]


def cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict:
    """Floating tensors to ``dtype`` (None keeps them); integer buffers are never cast."""
    if dtype is None:
        return dict(state_dict)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def save_folder(
    parts: ModelParts,
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``parts`` as a diffusers folder (safetensors), atomically: temp folder + rename."""
    path = Path(path)
    dtype = to_dtype(dtype, "dtype")
    if path.exists() and not (overwrite and path.is_dir()):
        raise CheckpointError(f"{path}: already exists (choose a new destination)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 -> what mkdir gives a new folder
        _write_folder(parts, tmp, dtype)
        if path.exists():  # overwrite: move the old folder aside only once the new one is whole
            old = tmp.with_suffix(".old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_folder(parts: ModelParts, root: Path, dtype: torch.dtype | None) -> None:
    version = DIFFUSERS_FORMAT_VERSION
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    family = parts.family
    for name, module, class_name in (
        (family.network_folder, parts.unet, family.network),  # unet/ or transformer/
        ("vae", parts.vae, "AutoencoderKL"),
    ):
        config = {"_class_name": class_name, "_diffusers_version": version}
        config.update(module.config.to_diffusers())
        _write_json(root / name / "config.json", config)
        weights = cast(module.state_dict(), dtype)
        save_state_dict(weights, root / name / "diffusion_pytorch_model.safetensors", meta)
    for spec, model, tokenizer in parts.text_modules():
        if model is None:  # an optional encoder the model does without (SD3's T5)
            continue
        _write_text_encoder(model, root / spec.subfolder, dtype, meta)
        tokenizer.save_pretrained(str(root / spec.tokenizer))
        _compact_json(root / spec.tokenizer / "tokenizer.json")
        _drop_load_options(root / spec.tokenizer / "tokenizer_config.json")
    scheduler = dict(parts.scheduler_config)
    scheduler.setdefault("_class_name", _scheduler_class(parts))
    scheduler["_diffusers_version"] = version
    if scheduler.get("timestep_spacing") in ("linspace", "trailing"):
        # diffusers warns on (and its SD pipelines rewrite) any steps_offset but 1; only "leading"
        # timesteps add it, so with these spacings 1 renders the same schedule
        scheduler["steps_offset"] = 1
    _write_json(root / "scheduler" / "scheduler_config.json", scheduler)
    index = {**DEFAULT_MODEL_INDEX, **parts.model_index, "_diffusers_version": version}
    index["_class_name"] = parts.family.pipeline_class
    if parts.family.name == "sdxl" and parts.unet.config.in_channels == 9:
        index["_class_name"] = "StableDiffusionXLInpaintPipeline"  # as diffusers saves one
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    if family.name != "sd1" and family.name != "sd2":  # pipelines without a safety checker
        for key in ("safety_checker", "requires_safety_checker", "feature_extractor"):
            index.pop(key, None)
    if family.network_folder != "unet":
        index.pop("unet", None)
        index[family.network_folder] = ["diffusers", family.network]
    if parts.family.name.startswith("sdxl"):
        index.setdefault("force_zeros_for_empty_prompt", parts.family.force_zeros_for_empty_prompt)
        if parts.family.micro_conditioning == "aesthetic":
            index["requires_aesthetics_score"] = True
    for spec in parts.family.text_encoders:
        model = getattr(parts, spec.subfolder)
        if model is None:  # diffusers' index names an empty slot [null, null]
            index[spec.subfolder], index[spec.tokenizer] = [None, None], [None, None]
            continue
        index[spec.subfolder] = ["transformers", type(model).__name__]
        index[spec.tokenizer] = ["transformers", "T5TokenizerFast" if spec.kind == "t5"
                                 else "CLIPTokenizer"]  # fmt: skip
    if parts.text_encoder is None:  # the SDXL refiner: diffusers' index names the empty slots
        index["text_encoder"], index["tokenizer"] = [None, None], [None, None]
    _write_json(root / "model_index.json", index)


def _write_text_encoder(model, folder: Path, dtype: torch.dtype | None, meta: dict) -> None:
    """A transformers text model (CLIP, T5 encoder) as config.json + model.safetensors."""
    # the classic ``text_model.``-prefixed keys: what every transformers version loads
    text_state = cast(model.state_dict(), dtype)
    if "shared.weight" in text_state:  # T5 ties it to encoder.embed_tokens: one copy on disk
        text_state.pop("encoder.embed_tokens.weight", None)
    if type(model).__name__.startswith("CLIP"):
        text_state = {
            k
            if k.startswith("text_projection.")
            else "text_model." + k.removeprefix("text_model."): v
            for k, v in text_state.items()
        }
    text_config = model.config.to_dict()
    text_config["architectures"] = [type(model).__name__]
    # transformers >= 5 loads a model in this dtype when from_pretrained is given none (older
    # ones in float32); diffusers loads the U-Net and VAE in float32 then: so must the text model
    text_config["dtype"] = "float32"
    text_config.pop("torch_dtype", None)
    _write_json(folder / "config.json", text_config)
    save_state_dict(text_state, folder / "model.safetensors", meta)


def _umask() -> int:
    """The process umask (read by setting it: there is no other portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _drop_load_options(path: Path) -> None:
    """transformers saves how the tokenizer was loaded (local_files_only, is_local): not part of
    the tokenizer, and wrong for whoever loads the folder next."""
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        for key in ("local_files_only", "is_local"):
            config.pop(key, None)
        atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _scheduler_class(parts: ModelParts) -> str:
    entry = parts.model_index.get("scheduler")
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else "PNDMScheduler"


def _compact_json(path: Path) -> None:
    """Rewrite a JSON file without indentation (same content): transformers writes CLIP's
    tokenizer.json pretty-printed, 3.6 MB, of which 1.7 MB is data; the demo model ships one."""
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        atomic_write_text(path, text + "\n")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
