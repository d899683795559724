#!/usr/bin/env python
"""Whole-process cost as a CLI user pays it: ``ldm txt2img`` against a plain diffusers script.

Builds (once, offline) an SD 1.5-shaped diffusers folder with random weights stored in fp16 (the
real U-Net, VAE and CLIP text-encoder configs of scripts/bench_txt2img.py, ldm's offline CLIP
tokenizer), then runs the two as separate processes in alternating order (ldm first in even
pairs, diffusers first in odd ones): 256x256, DPM++ 2M, CFG 7.5, seed 1, CPU fp32. Each process's
wall time and peak RSS (``os.wait4``'s ``ru_maxrss``) are recorded; the printed ratios are medians
of the per-pair ldm/diffusers ratios. ``--steps 20 1``: the 1-step run shows the fixed cost
(imports, loading, set-up) alone. Goals: wall <= 0.7x, peak RSS <= 1.0x.

    python scripts/bench_cli.py [--pairs 3] [--steps 20 1] [--workdir DIR]
    python scripts/bench_cli.py --ldm-pythonpath /path/to/other/tree   # an older ldm's CLI
    python scripts/bench_cli.py --profile --steps 1   # where ldm's process spends time and memory
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench_txt2img import SCHEDULER, TEXT, UNET, VAE  # noqa: E402  (one home for SD 1.5 configs)

PROMPT = "a photograph of an astronaut riding a horse"
SIZE, SCALE, SEED = 256, 7.5, 1
FOLDER_VERSION = "1"  # bump when the folder's contents change, so cached copies are rebuilt

# The diffusers side: what a diffusers user would write for the same image.
DIFFUSERS_SCRIPT = f"""
import sys, torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
folder, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
image = pipe({PROMPT!r}, height={SIZE}, width={SIZE}, num_inference_steps=steps,
             guidance_scale={SCALE}, generator=torch.Generator("cpu").manual_seed({SEED})).images[0]
image.save(out)
"""

# --profile: one ldm process, phase by phase (wall, CPU, RSS, peak RSS), cProfile of the load.
PROFILE_SCRIPT = f"""
import cProfile, pstats, sys, time
def mark(what, t=[time.perf_counter(), time.process_time()]):
    kb = dict(l.split(":", 1) for l in open("/proc/self/status"))
    gb = lambda k: int(kb[k].split()[0]) / 1024**2
    now, cpu = time.perf_counter(), time.process_time()
    print(f"{{what:28s}} {{now - t[0]:6.2f}} s wall {{cpu - t[1]:6.2f}} s cpu  "
          f"RSS {{gb('VmRSS'):5.2f}} GB  peak {{gb('VmHWM'):5.2f}} GB", flush=True)
    t[:] = now, cpu
import torch; mark("import torch")
import ldm.pipeline; mark("import ldm.pipeline")
prof = cProfile.Profile()
pipe = prof.runcall(ldm.pipeline.load_pipeline, sys.argv[1], "cpu", "fp32"); mark("load_pipeline")
pipe([{PROMPT!r}], [{SEED}], steps=int(sys.argv[2]), guidance_scale={SCALE}, sampler="dpmpp_2m",
     height={SIZE}, width={SIZE}); mark(f"generate {{sys.argv[2]}} step(s)")
pstats.Stats(prof).sort_stats("tottime").print_stats(15)
"""


def build_folder(folder: Path) -> Path:
    """Write the SD 1.5-shaped random-weight folder (fp16 safetensors) unless already there."""
    stamp = folder / ".bench_cli_version"
    if stamp.exists() and stamp.read_text() == FOLDER_VERSION:
        return folder
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.text.tokenizer import build_clip_tokenizer

    print(f"building the SD 1.5-shaped folder in {folder} (once) ...", flush=True)
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(
        unet=diffusers.UNet2DConditionModel(**UNET).half(),
        vae=diffusers.AutoencoderKL(**VAE).half(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)).half(),
        tokenizer=build_clip_tokenizer(),
        scheduler=diffusers.PNDMScheduler.from_config(SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    stamp.write_text(FOLDER_VERSION)
    return folder


def run_process(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one child process; its output is shown on failure."""
    # cwd: `python -m ldm` must not pick up a ./ldm folder (hence "ldm-out" for the images)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{output.decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def commands(args, folder: Path, steps: int, out: Path) -> dict[str, tuple[list[str], dict]]:
    """The two command lines and their environments."""
    ldm_env = dict(os.environ)
    if args.ldm_pythonpath:
        ldm_env["PYTHONPATH"] = args.ldm_pythonpath
    ldm_cmd = [
        args.ldm_python, "-m", "ldm", "txt2img", "--model", str(folder), "--prompt", PROMPT,
        "--H", str(SIZE), "--W", str(SIZE), "--steps", str(steps), "--sampler", "dpmpp_2m",
        "--guidance-scale", str(SCALE), "--seed", str(SEED), "--device", "cpu",
        "--outdir", str(out / "ldm-out"), "--no-progress", *args.ldm_args,
    ]  # fmt: skip
    diffusers_cmd = [args.diffusers_python, "-c", DIFFUSERS_SCRIPT, str(folder), str(steps)]
    diffusers_cmd.append(str(out / "diffusers.png"))
    return {"ldm": (ldm_cmd, ldm_env), "diffusers": (diffusers_cmd, dict(os.environ))}


def max_pixel_difference(out: Path) -> int:
    """Largest |ldm - diffusers| over the last pair's pixels: both did the same work."""
    ours = sorted((out / "ldm-out").rglob("*.png"), key=lambda p: p.stat().st_mtime)[-1]
    a = np.asarray(Image.open(ours).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(out / "diffusers.png").convert("RGB"), dtype=np.int16)
    return int(np.abs(a - b).max())


def bench(args, folder: Path, steps: int) -> None:
    """Time ``args.pairs`` alternating pairs at ``steps`` and print per-run and median ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(args, folder, steps, Path(tmp))
        rows = []
        for i in range(args.pairs):
            order = ("ldm", "diffusers") if i % 2 == 0 else ("diffusers", "ldm")
            got = {name: run_process(*cmds[name], Path(tmp)) for name in order}
            rows.append(got)
            (lw, lr), (dw, dr) = got["ldm"], got["diffusers"]
            print(
                f"  pair {i + 1} ({order[0]} first): ldm {lw:6.1f} s {lr:5.2f} GB | "
                f"diffusers {dw:6.1f} s {dr:5.2f} GB | {lw / dw:.2f}x wall {lr / dr:.2f}x RSS",
                flush=True,
            )
        diff = max_pixel_difference(Path(tmp))
    wall = statistics.median(r["ldm"][0] / r["diffusers"][0] for r in rows)
    rss = statistics.median(r["ldm"][1] / r["diffusers"][1] for r in rows)
    print(
        f"{steps} steps: median of {len(rows)} paired ratios ldm/diffusers: wall {wall:.2f}x "
        f"(goal <= 0.7), peak RSS {rss:.2f}x (goal <= 1.0); max pixel |diff| {diff}/255",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3, help="alternating ldm/diffusers pairs (3)")
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 1], help="runs (20 1)")
    ap.add_argument(
        "--workdir", type=Path, default=Path.home() / ".cache" / "ldm" / "bench-sd15",
        help="where the SD 1.5-shaped folder is built and kept (~/.cache/ldm/bench-sd15)",
    )  # fmt: skip
    ap.add_argument("--ldm-python", default=sys.executable, help="python that runs `-m ldm`")
    ap.add_argument("--ldm-pythonpath", help="PYTHONPATH for the ldm side (e.g. another tree)")
    ap.add_argument("--diffusers-python", default=sys.executable, help="python for diffusers")
    ap.add_argument("--profile", action="store_true", help="ldm's phases and load profile only")
    ap.add_argument("--ldm-args", nargs=argparse.REMAINDER, default=[],
                    help="extra ldm txt2img arguments (last on the line)")  # fmt: skip
    args = ap.parse_args()
    folder = build_folder(args.workdir)
    ldm_cmd, ldm_env = commands(args, folder, 1, folder)["ldm"]
    side = subprocess.run(
        [ldm_cmd[0], "-c", "import ldm; print(ldm.__path__[0])"], env=ldm_env, cwd=folder,
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    print(
        f"SD 1.5-shaped folder {folder} (fp16 weights), {SIZE}x{SIZE}, DPM++ 2M, CFG {SCALE}, "
        f"CPU fp32, {os.cpu_count()} CPUs; ldm from {side}",
        flush=True,
    )
    for steps in args.steps:
        if args.profile:
            ldm_cmd, ldm_env = commands(args, folder, steps, folder)["ldm"]
            cmd = [ldm_cmd[0], "-c", PROFILE_SCRIPT, str(folder), str(steps)]
            subprocess.run(cmd, env=ldm_env, cwd=folder, check=True)
        else:
            bench(args, folder, steps)


if __name__ == "__main__":
    main()
