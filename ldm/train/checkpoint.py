"""Training checkpoints: written atomically (temp folder + rename), the last K kept.

A checkpoint is a folder ``checkpoints/step-00000500/`` with the weights of the parts the run
has changed (``<part>.safetensors``: a part no stage has trained yet is the start model's, rebuilt
on resume, and a LoRA stage saves its LoRA layers alone; ``ldm.train.loop.save_checkpoint``), the
EMA shadows (``ema-<part>.safetensors``), the optimizer state
(``optimizer.pt``, tensors and plain containers only, read back with ``weights_only=True``) and
``state.json`` (stage, step, counters). A folder only ever appears under its final name complete,
so the newest one is always loadable; a crash while writing leaves the previous ones untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.errors import CheckpointError
from ldm.formats.safe_load import load_state_dict

PREFIX = "step-"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders start with '.' and are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX) :]))


def save_checkpoint(
    run_dir: Path,
    global_step: int,
    weights: dict[str, dict[str, torch.Tensor]],
    optimizer_state: dict,
    state: dict,
    keep: int,
) -> Path:
    """Write one checkpoint atomically, then delete all but the newest ``keep``."""
    for part, sd in weights.items():
        bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"refusing to checkpoint non-finite weights in {part}: {bad[0]}")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{global_step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        for part, sd in weights.items():
            tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
            # tied weights (T5's shared / encoder.embed_tokens): safetensors refuses shared storage
            seen = set()
            for k, v in tensors.items():
                if v.data_ptr() in seen and v.numel():
                    tensors[k] = v.clone()
                seen.add(v.data_ptr())
            save_file(tensors, str(tmp / f"{part}.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a re-run of the same step (after resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """(weights by part, optimizer state, state dict) of one checkpoint folder."""
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{path}: not a training checkpoint (no state.json)")
    weights = {f.stem: load_state_dict(f) for f in sorted(path.glob("*.safetensors"))}
    try:
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a refusal, never a retry
        raise CheckpointError(f"{path / 'optimizer.pt'}: cannot be read safely ({e})") from None
    return weights, optimizer_state, json.loads(state_file.read_text())


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None
