#!/usr/bin/env python
"""Benchmark: ldm's pipeline vs diffusers' StableDiffusionPipeline on identical random weights.

SD 1.5-shaped U-Net, VAE and CLIP text encoder (the real configs, random init, built in-process,
nothing downloaded), 256x256, 20 steps DPM++ 2M, guidance 7.5, CPU. Both pipelines get the same
weights, prompt and seed; each is warmed up once, then timed ``--repeats`` times alternately
(median wall time of the whole call: text encoding, sampling, VAE decode). Then ldm again in
``--dtype`` (default bf16) against its own fp32 image (PSNR). Goals: ldm fp32 <= 0.8x diffusers at
equal output; ldm bf16 <= 0.5x diffusers fp32 with PSNR >= 30 dB.

    python scripts/bench_txt2img.py [--repeats 3] [--quick] [--dtype bf16] [--threads N]
    python scripts/bench_txt2img.py --family sdxl --size 128 --steps 4 --repeats 2 --rounds 2

``--family sdxl``: an SDXL pipeline with the real U-Net, CLIP-L, OpenCLIP bigG and VAE configs,
ldm (accel auto) against diffusers' StableDiffusionXLPipeline (euler, CFG 5), fp32 and bf16, each
in its own process (peak RSS per process;
scripts/bench_sdxl.py).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np
import torch

UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)  # fmt: skip
TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)  # fmt: skip
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False, clip_sample=False,
    prediction_type="epsilon",
)  # fmt: skip
PROMPT = "a photograph of an astronaut riding a horse"


def build(seed: int = 0):
    """(diffusers pipeline, ldm ModelParts) sharing one set of random SD 1.5-shaped weights."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.formats.diffusers_folder import fix_vae_keys
    from ldm.models.build import build_network, build_vae
    from ldm.models.parts import ModelParts
    from ldm.text.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**UNET).eval()
    vae = diffusers.AutoencoderKL(**VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(**TEXT)).eval()
    tokenizer = build_clip_tokenizer()
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        diffusers.PNDMScheduler.from_config(SCHEDULER).config
    )
    theirs = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    theirs.set_progress_bar_config(disable=True)

    our_unet = build_network(dict(unet.config))
    our_unet.load_state_dict(unet.state_dict(), strict=True)
    our_vae = build_vae(dict(vae.config))
    our_vae.load_state_dict(fix_vae_keys(vae.state_dict()), strict=True)
    parts = ModelParts(
        our_unet.eval().requires_grad_(False), our_vae.eval().requires_grad_(False), text,
        tokenizer, dict(SCHEDULER), {}, None, "sd15-random",
    )  # fmt: skip
    return theirs, parts


def timed(fn) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    image = fn()
    return time.perf_counter() - start, np.asarray(image, dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per pipeline (3)")
    parser.add_argument("--quick", action="store_true", help="128x128, 5 steps, 1 repeat")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "none"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--tuned-malloc", action="store_true", help="ldm train's malloc (ldm/accel/malloc.py)"
    )
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--rounds", type=int, default=2, help="sdxl: processes per model (ABBA)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="sdxl: comma-separated")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.family == "sdxl":
        import bench_sdxl  # next to this script (sys.path[0])

        if args.threads:
            os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the worker processes'
        dtypes = args.dtypes.split(",")
        bench_sdxl.bench_txt2img(args.size // 8, args.steps, args.repeats, args.rounds, dtypes)
        return
    if args.quick:
        args.size, args.steps, args.repeats = 128, 5, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tuned_malloc:  # one process: ldm and diffusers both run under this setting
        from ldm.accel.malloc import tune_cpu_allocator

        print(f"glibc malloc tuned (ldm/accel/malloc.py): {tune_cpu_allocator()}")

    from ldm.pipeline import Pipeline

    theirs, parts = build()
    ours = Pipeline(parts, torch.device("cpu"), torch.float32)
    size, steps, scale, seed = args.size, args.steps, 7.5, 42

    def run_theirs():
        generator = torch.Generator("cpu").manual_seed(seed)
        return theirs(
            PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=scale,
            generator=generator,
        ).images[0]  # fmt: skip

    def run_ours(pipe):
        return pipe(
            [PROMPT], [seed], steps=steps, guidance_scale=scale, sampler="dpmpp_2m",
            height=size, width=size,
        )[0].image  # fmt: skip

    print(
        f"SD1.5-shaped random weights, {size}x{size}, {steps} steps dpmpp_2m, CFG {scale}, "
        f"CPU, {torch.get_num_threads()} threads, {args.repeats} repeats (median), torch "
        f"{torch.__version__}",
        flush=True,
    )
    with torch.inference_mode():
        run_theirs(), run_ours(ours)  # warm-up, not timed
        t_theirs, t_ours = [], []
        for _ in range(args.repeats):  # alternate, so both see the same machine load
            t, img_theirs = timed(run_theirs)
            t_theirs.append(t)
            t, img_ours = timed(lambda: run_ours(ours))
            t_ours.append(t)
    med_theirs, med_ours = statistics.median(t_theirs), statistics.median(t_ours)
    diff = np.abs(img_ours - img_theirs).max()
    print(f"diffusers fp32 : {med_theirs:7.2f} s   {' '.join(f'{t:.2f}' for t in t_theirs)}")
    print(f"ldm fp32       : {med_ours:7.2f} s   {' '.join(f'{t:.2f}' for t in t_ours)}")
    print(f"ratio ldm/diffusers fp32 = {med_ours / med_theirs:.3f} (goal <= 0.8); "
          f"max pixel diff {diff:.0f}/255")  # fmt: skip

    if args.dtype == "none":
        return
    theirs = None  # free its weights before converting ours
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.to(dtype)
    low = Pipeline(parts, torch.device("cpu"), dtype)
    with torch.inference_mode():
        run_ours(low)  # warm-up
        t_low = []
        for _ in range(args.repeats):
            t, img_low = timed(lambda: run_ours(low))
            t_low.append(t)
    med_low = statistics.median(t_low)
    print(f"ldm {args.dtype}       : {med_low:7.2f} s   {' '.join(f'{t:.2f}' for t in t_low)}")
    print(f"ratio ldm {args.dtype}/diffusers fp32 = {med_low / med_theirs:.3f} (goal <= 0.5); "
          f"PSNR vs ldm fp32 {psnr(img_low, img_ours):.1f} dB (goal >= 30)")  # fmt: skip


if __name__ == "__main__":
    main()
