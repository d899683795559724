"""A distilled student as a model ldm loads by name: a LoRA bundle or a full folder, each with
``ldm_model.json`` holding its sampling defaults (``distill.sampler``, else ``lcm`` or ``tcd``
as its consistency function; its step count; guidance 1), so ``ldm txt2img --model <it>``
needs no extra flag.

LoRA bundle (the default when the distill stage is the run's only stage and the teacher came from
``model.pretrained``; for a full student, when ``distill.export_lora_rank`` asks for one:
the truncated SVD of its weight change, ``ldm.formats.lora_extract``):
``pytorch_lora_weights.safetensors`` (diffusers/PEFT keys, what diffusers' ``load_lora_weights``
reads) + ``ldm_model.json`` {"kind": "lora", "base": teacher,
"lora": file, "lora_scale": 1.0, "defaults": {...}, "description": ...}. Otherwise the LoRA is
merged and the whole model is written as a diffusers folder whose ``ldm_model.json`` holds only
{"defaults": {...}}. Both appear under their final name complete (temp folder + rename).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from ldm.dtypes import DTYPES
from ldm.errors import ConfigError
from ldm.formats.diffusers_folder import save_folder
from ldm.formats.lora import DIFFUSERS_NAME, save_diffusers_lora
from ldm.formats.lora_extract import extract_lora
from ldm.formats.safe_load import save_state_dict
from ldm.loading import DEFAULT_MODEL
from ldm.models.bundled import write_manifest
from ldm.train.config import StageConfig, TrainConfig


def student_defaults(stage: StageConfig) -> dict:
    """The student's sampling defaults: its configured sampler, else its consistency
    function's (``lcm`` or ``tcd``, named alike), at its first step count, no guidance, and
    its configured eta (a TCD student's gamma) when set."""
    steps = stage.distill.student_steps[0]
    sampler = stage.distill.sampler or stage.distill.consistency
    defaults = {"sampler": sampler, "schedule": "default", "steps": steps, "guidance_scale": 1.0}
    if stage.distill.eta is not None:
        defaults["eta"] = stage.distill.eta
    return defaults


def teacher_reference(pretrained: str) -> str:
    """How a bundle names its base: a bundled model by name ("shapes-demo"), else a path."""
    path = Path(pretrained).expanduser()
    if path.exists() and path.resolve().parent == DEFAULT_MODEL.resolve().parent:
        return path.resolve().name
    return str(path.resolve()) if path.exists() else pretrained


def is_lora_bundle(cfg: TrainConfig) -> bool:
    """The export is a LoRA on the teacher when nothing trained before the distill stage (a
    full student's: when it asks for one)."""
    last = cfg.stages[-1]
    extracted = last.distill is not None and last.distill.export_lora_rank is not None
    wanted = last.method == "lora" or extracted
    return len(cfg.stages) == 1 and wanted and cfg.model.pretrained is not None


def check_export(cfg: TrainConfig) -> None:
    """Before training: a LoRA export of a full student needs a teacher to be a LoRA on."""
    for stage in cfg.stages:
        if stage.distill is not None and stage.distill.export_lora_rank is not None:
            if not is_lora_bundle(cfg):
                raise ConfigError(f"stages.{stage.name}.distill.export_lora_rank: the LoRA is on "
                                  "the teacher, so the distill stage must be the only stage and "
                                  "the teacher come from model.pretrained")  # fmt: skip


def export_student(
    parts, cfg: TrainConfig, run_dir: Path, final: Path, teacher: torch.nn.Module | None = None
) -> Path:
    """Write the run's distilled student to ``final`` (a LoRA bundle or a full folder);
    ``teacher``: a full student's frozen teacher (for ``export_lora_rank``)."""
    stage = cfg.stages[-1]
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        out = tmp / "student"
        if is_lora_bundle(cfg):
            out.mkdir()
            rank, how = stage.lora.rank, ""
            if stage.method == "lora":
                write_lora(run_dir / f"lora-{stage.name}" / DIFFUSERS_NAME, out / DIFFUSERS_NAME,
                           DTYPES[cfg.export_dtype])  # fmt: skip
            else:
                rank = stage.distill.export_lora_rank
                pairs, report = extract_lora(teacher.state_dict(), parts.unet.state_dict(), rank)
                save_diffusers_lora(pairs, out / DIFFUSERS_NAME, DTYPES[cfg.export_dtype])
                how = f", extracted from a full student: {100 * report.kept:.1f}% of its change"
            manifest = {
                "kind": "lora",
                "base": teacher_reference(cfg.model.pretrained),
                "lora": DIFFUSERS_NAME,
                "lora_scale": 1.0,
                "defaults": student_defaults(stage),
                "description": f"{stage.distill.consistency.upper()}-LoRA distilled from "
                f"{cfg.model.pretrained} by ldm distill (stage '{stage.name}', {stage.steps} "
                f"steps, rank {rank}{how})",
            }
        else:
            save_folder(parts, out, dtype=DTYPES[cfg.export_dtype])
            # the teacher's stored defaults (an SD3 model's T5-block length) carry over
            manifest = {"defaults": {**parts.defaults, **student_defaults(stage)}}
        write_manifest(out, manifest)
        os.replace(out, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_lora(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """Copy a diffusers LoRA file in ``dtype``, its metadata kept."""
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k).to(dtype) for k in f.keys()}
    save_state_dict(tensors, dst, metadata=metadata)
