"""ldm batch killed with SIGKILL mid-run, several times, then resumed; and sharded over 2 processes:
the final images are byte-identical to one uninterrupted single-process run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ldm.batch import manifest
from ldm.cli import main

PROMPTS = "".join(f"prompt number {i}\n" for i in range(8))
ARGS = ["--steps", "4", "--batch-size", "2", "--n-per-prompt", "2", "--no-progress"]


def command(tiny, prompts, outdir) -> list[str]:
    return ["batch", "--prompts", str(prompts), "--model", str(tiny), "--outdir", str(outdir),
            *ARGS]  # fmt: skip


def outputs(outdir) -> dict[str, bytes]:
    """Every file a run leaves, but the manifest (its timings differ run to run)."""
    return {
        str(p.relative_to(outdir)): p.read_bytes()
        for p in sorted(outdir.rglob("*"))
        if p.is_file() and p.name != manifest.MANIFEST
    }


def check_manifest_lists_only_complete_images(outdir) -> int:
    entries = manifest.read(outdir)
    for name, e in entries.items():
        assert e["status"] == "ok"
        assert manifest.file_sha256(outdir / name) == e["sha256"]
    return len(entries)


@pytest.fixture(scope="module")
def reference(tiny_sd1, tmp_path_factory):
    """One uninterrupted single-process run, with the runs' one thread (``env()``): CPU
    reductions split by thread count (the tiny VAE's decode differs by ~1e-6 between 1 and 2
    threads), which can move a pixel by 1/255."""
    tmp = tmp_path_factory.mktemp("reference")
    (tmp / "p.txt").write_text(PROMPTS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(command(tiny_sd1, tmp / "p.txt", tmp / "out")) == 0
    finally:
        torch.set_num_threads(threads)
    files = outputs(tmp / "out")
    assert len(files) == 16
    return files


def env() -> dict:
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def test_sigkill_mid_run_then_resume_is_byte_identical(tiny_sd1, tmp_path, reference):
    (tmp_path / "p.txt").write_text(PROMPTS)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ldm", *command(tiny_sd1, tmp_path / "p.txt", out)]
    kills = 0
    for attempt in range(3):
        before = len(manifest.read(out)) if out.exists() else 0
        proc = subprocess.Popen(cmd, env=env(), stderr=subprocess.DEVNULL)
        # kill once this run has made an image or two: mid-batch, mid-write or mid-append
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / manifest.MANIFEST).exists() and len(
                manifest.read(out)
            ) >= before + 1 + attempt:
                time.sleep(0.05 * attempt)
                break
            time.sleep(0.02)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        check_manifest_lists_only_complete_images(out)
        # a kill may land after the last image, or the run may exit just before it: both fine
        assert proc.returncode == 0 or (killed and proc.returncode == -signal.SIGKILL)
    assert kills >= 2
    assert subprocess.run(cmd, env=env(), stderr=subprocess.DEVNULL).returncode == 0
    assert check_manifest_lists_only_complete_images(out) == 16
    assert outputs(out) == reference  # same names, same bytes, no temp files left


def test_two_processes_make_the_same_images_as_one(tiny_sd1, tmp_path, reference):
    (tmp_path / "p.txt").write_text(PROMPTS)
    out = tmp_path / "out"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", "29517", "-m", "ldm",
              *command(tiny_sd1, tmp_path / "p.txt", out), "--device", "cpu"]  # fmt: skip
    result = subprocess.run(launch, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rank 0:" in result.stderr and "rank 1:" in result.stderr
    assert outputs(out) == reference
    ranks = {e["rank"] for e in manifest.read(out).values()}
    assert ranks == {0, 1} and check_manifest_lists_only_complete_images(out) == 16
