"""One SD3.5-medium transformer measurement: build ldm's or diffusers' model, time, write.

Run by ``scripts/bench_sd3.py`` (the driver), one process per measurement so its RSS high-water
mark is its own: ``python scripts/bench_sd3_worker.py --impl ldm|diffusers --dtype fp32|bf16
--out STEM``. Weights are drawn per key as in ``bench_sdxl_worker.py`` (a checksum proves both
processes hold the same ones); the position table is the real sin-cos one.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

import torch
from bench_sdxl_worker import DTYPES, assign_, checksum, peak_rss_gb, trim

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (2.5 B parameters)
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
    dual_attention_layers=list(range(13)), qk_norm="rms_norm",
)  # fmt: skip


def build(impl: str, dtype: torch.dtype) -> tuple[torch.nn.Module, float, str]:
    """The transformer with the drawn weights: ldm's (``ldm.accel`` auto) or diffusers'."""
    from ldm.models.mmdit import SD3Config, SD3Transformer2DModel
    from ldm.models.mmdit_blocks import sincos_pos_embed_2d

    with torch.device("meta"):
        if impl == "ldm":
            model = SD3Transformer2DModel(SD3Config.from_diffusers(SD35_MEDIUM))
        else:
            from diffusers import SD3Transformer2DModel as Theirs

            model = Theirs(**SD35_MEDIUM)
    model = assign_(model, dtype).eval()
    with torch.no_grad():  # the real (deterministic) table instead of drawn numbers
        model.pos_embed.pos_embed.copy_(sincos_pos_embed_2d(1536, 384, 64)[None])
    total = checksum(model)
    if impl == "diffusers":
        return model, total, "eager"
    from ldm import accel

    decision = accel.apply(model, "auto", device=torch.device("cpu"), dtype=dtype)
    return model, total, decision.mode


def inputs(latent: int, batch: int, tokens: int, dtype: torch.dtype) -> tuple:
    """Latents, timesteps (sigma * 1000), T5 + CLIP context (77 + 256 tokens), pooled CLIP."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 16, latent, latent, generator=gen).to(dtype)
    t = torch.tensor([999.0, 500.0, 250.0, 1.0] * batch)[:batch]
    context = torch.randn(batch, tokens, 4096, generator=gen).to(dtype)
    pooled = torch.randn(batch, 2048, generator=gen).to(dtype)
    return x, t, context, pooled


def timed(fn, warmup: int, repeats: int) -> tuple[list[float], list[float], torch.Tensor]:
    """Wall and process CPU seconds per call. With one thread the CPU time is the work itself,
    whatever else the machine runs (wall time then includes waiting for a core)."""
    for _ in range(warmup):
        out = fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus, out


def worker(args) -> None:
    """Build one model, time its forward per latent size, write {times, peak RSS, checksum,
    load} and the outputs. One warm-up call before the first size only (a process's one-time
    costs); later sizes are timed from their first call, the same for both implementations."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    load = [os.getloadavg()[0]]
    start = time.perf_counter()
    model, total, mode = build(args.impl, dtype)
    trim()
    build_s = time.perf_counter() - start
    times, cpu_times, outs = {}, {}, {}
    for i, latent in enumerate(args.latents):
        x, t, context, pooled = inputs(latent, args.batch, args.tokens, dtype)
        if args.impl == "ldm":
            call = partial(model, x, t, encoder_hidden_states=context, pooled_projections=pooled)
        else:
            call = partial(lambda *a: model(*a, return_dict=False)[0], x, context, pooled, t)
        with torch.inference_mode():
            times[latent], cpu_times[latent], out = timed(call, 1 if i == 0 else 0, args.repeats)
        outs[latent] = out.float()
    torch.save(outs, f"{args.out}.pt")
    load.append(os.getloadavg()[0])
    result = dict(times=times, cpu_times=cpu_times, peak_rss_gb=peak_rss_gb(), checksum=total,
                  load=load, build_s=build_s, accel=mode,
                  threads=torch.get_num_threads())  # fmt: skip
    tmp = Path(f"{args.out}.json.tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(f"{args.out}.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("ldm", "diffusers"), required=True)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--latents", type=int, nargs="+", default=[32, 64], help="latent sides")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=333, help="context: 77 CLIP + 256 T5")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", required=True, help="path stem of the result files")
    worker(parser.parse_args())


if __name__ == "__main__":
    main()
