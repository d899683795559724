"""The trainer end to end on a tiny model: stages, export, exact resume after SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny.yaml"
FAST = ["validation_prompts=[]", "stages.0.steps=2"]


def _train(out: Path, *extra: str, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ldm", "train", "--config", str(TINY), f"output_dir={out}",
           *FAST, *extra, "--no-progress"]  # fmt: skip
    if resume:
        cmd.append("--resume")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _final_weights(run: Path, parts=("unet", "vae")) -> dict[str, torch.Tensor]:
    final = run / "final"
    return {
        f"{part}/{k}": v
        for part in parts
        for k, v in load_file(str(final / part / "diffusion_pytorch_model.safetensors")).items()
    }


def _wait_for(path: Path, proc: subprocess.Popen, hang_guard_s: float = 3600) -> None:
    """Wait until the run writes ``path``. The run is finite, so it writes it or exits (a
    failure); the guard, far above any run's length, only stops a run that hangs."""
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        if time.monotonic() - start > hang_guard_s:
            proc.kill()
            pytest.fail(f"the run hung: no {path.name} after {hang_guard_s} s")
        time.sleep(0.05)


def test_train_export_and_load(tmp_path):
    from ldm.config import load_config
    from ldm.formats.diffusers_folder import load_folder
    from ldm.train.config import TrainConfig
    from ldm.train.loop import train

    cfg = load_config(TrainConfig, TINY, [f"output_dir={tmp_path}", *FAST])
    final = train(cfg, progress=False)
    parts = load_folder(final)
    assert parts.vae.config.scaling_factor != 1.0  # calibrated after the VAE stage
    assert (tmp_path / "metrics.csv").read_text().count("\n") >= 6
    assert (tmp_path / "config.yaml").is_file()
    assert len(list((tmp_path / "checkpoints").iterdir())) <= cfg.keep_checkpoints
    from ldm.errors import LdmError

    with pytest.raises(LdmError, match="final: already exists"):  # refused before any step
        train(cfg, progress=False)


def test_bf16_nchw_training_runs_with_the_math_attention_kernel(tmp_path, monkeypatch):
    """The demo recipe's settings: bf16 autocast, NCHW U-Net, SDPA math kernel on the CPU."""
    import contextlib

    from ldm.config import load_config
    from ldm.formats.diffusers_folder import load_folder
    from ldm.train import loop
    from ldm.train.config import TrainConfig

    flash_enabled = []  # the SDPA flag inside each training forward
    original = loop.attention_kernels

    @contextlib.contextmanager
    def spy(device, mixed_precision):
        with original(device, mixed_precision):
            flash_enabled.append(torch.backends.cuda.flash_sdp_enabled())
            yield

    monkeypatch.setattr(loop, "attention_kernels", spy)
    overrides = [f"output_dir={tmp_path}", *FAST, "stages.1.steps=2", "mixed_precision=bf16",
                 "channels_last=false"]  # fmt: skip
    cfg = load_config(TrainConfig, TINY, overrides)
    from accelerate.state import AcceleratorState

    # accelerate's state is process-wide: earlier and later in-process runs use "no"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        parts = load_folder(loop.train(cfg, progress=False))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert flash_enabled and not any(flash_enabled)  # the math kernel ran every step
    assert all(torch.isfinite(p).all() for p in parts.unet.parameters())
    with loop.attention_kernels(torch.device("cpu"), "no"):  # fp32 keeps the flash kernel
        assert torch.backends.cuda.flash_sdp_enabled()


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    steps = ["stages.1.steps=6", "checkpoint_every=1"]
    ref = _train(tmp_path / "ref", *steps)
    assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()[-2000:]

    run = tmp_path / "killed"
    kills = 0
    for target in ("step-00000004", "step-00000006"):  # kill twice, mid-stage
        proc = _train(run, *steps, resume=kills > 0)
        _wait_for(run / "checkpoints" / target, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    # resume from an older checkpoint than the newest: metrics.csv holds rows past it
    newest = max((run / "checkpoints").glob("step-*"))
    shutil.rmtree(newest)
    proc = _train(run, *steps, resume=True)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]
    # no temp folders left visible as checkpoints, and the result equals the reference
    a, b = _final_weights(tmp_path / "ref"), _final_weights(run)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    # the metrics log reads as one run's: the rows after each resumed checkpoint are not doubled
    ref_log, run_log = (
        _metrics_steps_and_losses(r / "metrics.csv") for r in (tmp_path / "ref", run)
    )
    assert [s for s, _ in run_log] == [s for s, _ in ref_log] and len(ref_log) > 6
    assert [loss for _, loss in run_log] == pytest.approx([loss for _, loss in ref_log], rel=1e-5)


def _metrics_steps_and_losses(path: Path) -> list[tuple[int, float]]:
    import csv

    with open(path, newline="") as f:
        return [(int(r["global_step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_export_ema_chooses_the_exported_weights(tmp_path):
    """export_ema true exports the EMA shadow, false the raw weights (same training run)."""
    from ldm.config import load_config
    from ldm.train.config import TrainConfig
    from ldm.train.loop import train
    from ldm.train.model import load_start_model

    # one diffusion step with decay 0.5 and no warm-up: shadow = (start + trained) / 2
    common = ["validation_prompts=[]", "stages.0.steps=1", "stages.1.steps=1",
              "stages.1.ema.decay=0.5", "stages.1.ema.warmup=false"]  # fmt: skip
    exported = {}
    for flag in ("true", "false"):
        cfg = load_config(
            TrainConfig, TINY, [f"output_dir={tmp_path / flag}", f"export_ema={flag}", *common]
        )
        train(cfg, progress=False)
        exported[flag] = _final_weights(tmp_path / flag, ("unet",))
    start = {f"unet/{k}": v for k, v in load_start_model(cfg).unet.state_dict().items()}
    ema, raw = exported["true"], exported["false"]
    assert ema.keys() == raw.keys() and set(raw) <= set(start)
    moved = [k for k in raw if not torch.equal(raw[k], start[k])]
    assert moved  # the step changed the weights, so EMA and raw differ
    for k in raw:
        torch.testing.assert_close(ema[k], (start[k] + raw[k]) / 2, rtol=1e-5, atol=1e-6)


def test_nonfinite_loss_stops_without_checkpoint(tmp_path):
    from ldm.config import load_config
    from ldm.errors import LdmError
    from ldm.train.config import TrainConfig
    from ldm.train.loop import train

    cfg = load_config(
        TrainConfig, TINY,
        [f"output_dir={tmp_path}", *FAST, "stages.0.optim.lr=1e30", "stages.0.optim.grad_clip=1e30",
         "stages.0.steps=6", "stages.0.loss.max_nonfinite=2"],
    )  # fmt: skip
    with pytest.raises(LdmError, match="non-finite"):
        train(cfg, progress=False)
    for ck in (tmp_path / "checkpoints").glob("step-*"):
        for f in ck.glob("*.safetensors"):
            assert all(torch.isfinite(v).all() for v in load_file(str(f)).values())


def test_validation_mid_stage_keeps_training(tmp_path, monkeypatch):
    """A validation grid mid-stage must not freeze the parts being trained, nor give them the
    inference-only accelerator routes (packed weights)."""
    from ldm.accel.packed import PackedLinear
    from ldm.config import load_config
    from ldm.train import loop
    from ldm.train.config import TrainConfig

    packed, after_step = [], loop.after_step

    def spy(run, st, step, row):
        after_step(run, st, step, row)
        packed.extend(m for m in run.parts.unet.modules() if isinstance(m, PackedLinear))

    monkeypatch.setattr(loop, "after_step", spy)
    cfg = load_config(
        TrainConfig, TINY,
        [f"output_dir={tmp_path}", "stages.0.steps=1", "stages.1.steps=3", "validate_every=1",
         "validation_prompts=[a red circle]", "validation_steps=1"],
    )  # fmt: skip
    loop.train(cfg, progress=False)
    assert len(list((tmp_path / "samples").glob("diffusion-*.png"))) == 3
    assert packed == []


def test_lora_finetune_on_an_image_folder(tiny_sd1, tmp_path):
    """LoRA stage on an exported image-caption folder: both LoRA files, a loadable export."""
    from ldm.config import load_config
    from ldm.data.shapes import export
    from ldm.formats.diffusers_folder import load_folder
    from ldm.formats.lora import apply_lora
    from ldm.train.config import TrainConfig
    from ldm.train.loop import train

    data = export(tmp_path / "data", 8)
    cfg = load_config(
        TrainConfig, ROOT / "configs" / "train" / "lora-diamond.yaml",
        [f"output_dir={tmp_path / 'run'}", f"model.pretrained={tiny_sd1}", f"data.source={data}",
         "stages.0.steps=3", "stages.0.batch_size=2", "data.resolution=32", "checkpoint_every=2"],
    )  # fmt: skip
    final = train(cfg, progress=False)
    lora_dir = tmp_path / "run" / "lora-diamond"
    files = sorted(p.name for p in lora_dir.iterdir())
    assert files == ["lora_kohya.safetensors", "pytorch_lora_weights.safetensors"]
    parts = load_folder(final)  # merged export: plain diffusers names
    report = apply_lora(load_folder(tiny_sd1), lora_dir / "pytorch_lora_weights.safetensors")
    assert report.matched and not report.unmatched
    assert parts.unet.state_dict().keys() == load_folder(tiny_sd1).unet.state_dict().keys()


def test_shapes_mix_reaches_the_training_batches():
    """data.shapes_mix weights the caption families the trainer sees ("position=1": only those)."""
    from ldm.data.shapes import parse_prompt
    from ldm.train.batches import ShapesBatches
    from ldm.train.config import DataConfig

    batches = ShapesBatches(DataConfig(shapes_mix="position=1", shapes_size_words=0.0), 8)
    _, captions = batches.images(3)
    assert {parse_prompt(c).task for c in captions} == {"position"}
    with pytest.raises(Exception, match="unknown task 'place'"):
        ShapesBatches(DataConfig(shapes_mix="place=1"), 8)


def test_shapes_layout_reaches_the_training_batches():
    """data.shapes_layout: "tidy" batches are the tidy world's images, "random" the world's own."""
    from ldm.data.shapes import generate
    from ldm.train.batches import ShapesBatches
    from ldm.train.config import DataConfig

    for layout in ("random", "tidy"):
        batches = ShapesBatches(DataConfig(shapes_layout=layout, shapes_size_words=0.0), 4)
        pixels, captions = batches.images(2)  # step 2: indices 8..11
        for j, i in enumerate(range(8, 12)):
            image, caption, _ = generate(0, i, layout=layout)
            assert caption == captions[j]
            expected = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
            assert torch.equal(pixels[j], expected)
    with pytest.raises(Exception, match="unknown shapes layout 'grid'"):
        ShapesBatches(DataConfig(shapes_layout="grid"), 8)


def test_lora_demo_detector_tells_diamonds_from_the_world(tmp_path):
    """scripts/lora_concept_demo.py: its training folder is all diamonds, world shapes are not."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import lora_concept_demo as demo
    finally:
        sys.path.pop(0)
    from PIL import Image

    from ldm.data.shapes import SHAPES, render_prompt

    folder = demo.make_folder(tmp_path / "diamonds", 16)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 16 and all(line.endswith(' diamond"}') for line in lines)
    diamonds = [Image.open(folder / f"{i:05d}.png") for i in range(16)]
    assert demo.diamond_score(diamonds) == 1.0
    world = [render_prompt(f"a {s}", 0, i)[0] for s in SHAPES for i in range(8)]
    assert demo.diamond_score(world) == 0.0
