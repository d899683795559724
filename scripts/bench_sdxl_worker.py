"""One SDXL benchmark measurement: build ldm's or diffusers' model, time it, write the results.

Run by ``scripts/bench_sdxl.py`` (the driver), one process per measurement so its RSS
high-water mark is its own: ``python scripts/bench_sdxl_worker.py --worker unet|txt2img
--impl ldm|diffusers --dtype fp32|bf16 --out STEM``. Every process draws the same weights from a
per-key seeded pool (a checksum of the state dict proves it).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import time
import zlib
from pathlib import Path

import torch

PROMPT = "a photograph of an astronaut riding a horse"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLIP_L, BIGG = "text_encoder", "text_encoder_2"
# the SDXL VAE is SD's architecture with another latent scale (its config.json)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.13025, force_upcast=True,
)  # fmt: skip


def family_configs() -> dict:
    """The SDXL base configs ldm ships, the U-Net's completed with UNetConfig's defaults."""
    from ldm.models.families import FAMILIES
    from ldm.models.unet import UNetConfig

    configs = dict(FAMILIES["sdxl"].single_file)
    unet = UNetConfig.from_diffusers(configs["unet"]).to_diffusers()
    unet.pop("_class_name")
    return {**configs, "unet": unet, "vae": VAE}


# ---------------------------------------------------------------- weights, same in every process


POOL_SIZE = 1_000_003  # a prime: a matrix's rows never repeat the pool in step
_pool: list[torch.Tensor] = []


def draw(key: str, shape: torch.Size, seed: int, dtype: torch.dtype = torch.float32):
    """One tensor of random weights, a function of (key, shape, seed) only (order-free).

    Each tensor is a stretch of one seeded uniform pool (starting where the key's CRC says,
    wrapping around): drawing 2.6 B numbers one by one takes minutes on a loaded CPU, a scaled
    copy takes one pass. Norm scales are 1; other vectors (biases) small; matrices and kernels
    uniform in +-1/sqrt(fan_in) (torch's default init scale), so activations stay O(1).
    """
    if len(shape) == 1 and "norm" in key and key.endswith("weight"):
        return torch.ones(shape, dtype=dtype)
    if not _pool:  # uniform in [-1, 1)
        gen = torch.Generator().manual_seed(seed)
        _pool.append(torch.rand(POOL_SIZE, generator=gen).mul_(2).sub_(1))
    pool, n = _pool[0], shape.numel()
    # written straight in ``dtype``: no float32 temporaries to fragment the heap before the
    # measurement starts
    out, start, done = torch.empty(n, dtype=dtype), zlib.crc32(key.encode()) % POOL_SIZE, 0
    bound = 0.02 if len(shape) == 1 else (shape[1:].numel() or 1) ** -0.5
    while done < n:
        chunk = min(n - done, POOL_SIZE - start)
        torch.mul(pool[start : start + chunk], bound, out=out[done : done + chunk])
        done, start = done + chunk, 0
    return out.view(shape)


def random_state(model: torch.nn.Module, dtype: torch.dtype, seed: int = 0) -> dict:
    """A full state dict for ``model`` (possibly on the meta device): ``draw`` per key."""
    return {k: draw(k, v.shape, seed, dtype) for k, v in model.state_dict().items()}


def fill_(model: torch.nn.Module, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Overwrite an allocated model's parameters in place, one tensor at a time (low peak)."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(draw(k, v.shape, seed))
    return model.to(dtype)


def assign_(model: torch.nn.Module, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A meta-device model's tensors made real (drawn), without a second copy of them."""
    model.load_state_dict(random_state(model, dtype, seed), strict=True, assign=True)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"left on the meta device: {meta[:3]}")
    return model


def checksum(*models: torch.nn.Module) -> float:
    """Every 97th weight summed in float64, per key in sorted order: equal here means the
    processes drew the same weights (a plain state dict: call it before ``ldm.accel``)."""
    total = 0.0
    for model in models:
        state = model.state_dict()
        for k in sorted(state):
            if state[k].is_floating_point():
                total += state[k].reshape(-1)[::97].sum(dtype=torch.float64).item()
    return total


def trim() -> None:
    gc.collect()
    try:  # glibc: hand freed arenas back, so the next model's RSS starts low
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---------------------------------------------------------------- models


def build_unet(impl: str, dtype: torch.dtype, configs: dict, accelerate: bool = True):
    """The SDXL U-Net with the drawn weights: ldm's (``ldm.accel`` auto applied) or diffusers'."""
    if impl == "ldm":
        from ldm import accel
        from ldm.models.build import build_network

        model = assign_(build_network(configs["unet"], family="sdxl", empty=True), dtype).eval()
        total = checksum(model)
        if not accelerate:  # the pipeline applies its default itself
            return model, total, None
        decision = accel.apply(model, "auto", device=torch.device("cpu"), dtype=dtype)
        return model, total, decision.mode
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(**configs["unet"])
    model = assign_(model, dtype).eval()
    return model, checksum(model), "eager"


def unet_inputs(latent: int, batch: int, dtype: torch.dtype) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, latent, latent, generator=gen).to(dtype)
    t = torch.tensor([999, 500, 250, 1][:batch] * (batch // 4 + 1))[:batch]
    context = torch.randn(batch, 77, 2048, generator=gen).to(dtype)
    pooled = torch.randn(batch, 1280, generator=gen).to(dtype)
    size = 8 * latent  # micro-conditioning as the pipelines build it: (H, W, top, left, H, W)
    ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=dtype)
    return (x, t, context), {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}


def build_pipeline(impl: str, dtype: torch.dtype, configs: dict):
    """An SDXL pipeline on the drawn weights (real shapes): ldm's Pipeline or diffusers'."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm.text.tokenizer import build_clip_tokenizer

    texts = []
    for key, cls in ((CLIP_L, CLIPTextModel), (BIGG, CLIPTextModelWithProjection)):
        cfg = {k: v for k, v in configs[key].items() if k != "architectures"}
        texts.append(fill_(cls(CLIPTextConfig(**cfg)), dtype).eval())  # ~3 GB, filled in place
    tokenizers = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")  # OpenCLIP pads 0
    unet, total, mode = build_unet(impl, dtype, configs, accelerate=False)
    total += checksum(*texts)
    if impl == "ldm":
        from ldm.models.build import build_vae
        from ldm.models.families import FAMILIES
        from ldm.models.parts import ModelParts
        from ldm.pipeline import Pipeline

        vae = assign_(build_vae(configs["vae"], empty=True), dtype)
        parts = ModelParts(
            unet, vae, texts[0], tokenizers[0], dict(configs["scheduler"]), name="sdxl-random",
            family=FAMILIES["sdxl"], text_encoder_2=texts[1], tokenizer_2=tokenizers[1],
        )  # fmt: skip
        pipe = Pipeline(parts, torch.device("cpu"), dtype)  # accel: ldm's default (auto)
        total += checksum(vae)
        return pipe, total, pipe.accelerate().mode
    import diffusers

    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**configs["vae"])
    vae = assign_(vae, dtype).eval()
    scheduler = diffusers.EulerDiscreteScheduler.from_config(configs["scheduler"])
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=texts[0], text_encoder_2=texts[1], tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe, total + checksum(vae), mode


# ---------------------------------------------------------------- one measurement (a process)


def timed(fn, warmup: int, repeats: int) -> tuple[list[float], object]:
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def worker(args) -> None:
    """Build one model, time it, write {times, peak RSS, checksum, load} and its output."""
    torch.manual_seed(0)
    dtype, configs = DTYPES[args.dtype], family_configs()
    load = [os.getloadavg()[0]]
    start = time.perf_counter()
    if args.worker == "unet":
        model, total, mode = build_unet(args.impl, dtype, configs)
        trim()
        build_s = time.perf_counter() - start
        xs, kw = unet_inputs(args.latent, args.batch, dtype)

        def call():
            out = model(*xs, **kw)
            return out.sample if hasattr(out, "sample") else out

        with torch.inference_mode():
            times, out = timed(call, 1, args.repeats)
        torch.save(out.float(), f"{args.out}.pt")
    else:
        pipe, total, mode = build_pipeline(args.impl, dtype, configs)
        trim()
        build_s = time.perf_counter() - start
        size, scale, seed = 8 * args.latent, 5.0, 42
        if args.impl == "ldm":

            def call(steps=args.steps):
                return pipe(
                    [PROMPT], [seed], steps=steps, guidance_scale=scale, sampler="euler",
                    height=size, width=size,
                )[0].image  # fmt: skip
        else:

            def call(steps=args.steps):
                generator = torch.Generator("cpu").manual_seed(seed)
                return pipe(
                    PROMPT, height=size, width=size, num_inference_steps=steps,
                    guidance_scale=scale, generator=generator,
                ).images[0]  # fmt: skip

        with torch.inference_mode():
            call(steps=1)  # warm-up: one step runs every part once
            times, image = timed(call, 0, args.repeats)
        import numpy as np

        np.save(f"{args.out}.npy", np.asarray(image))
    load.append(os.getloadavg()[0])
    result = dict(times=times, peak_rss_gb=peak_rss_gb(), checksum=total, load=load,
                  build_s=build_s, accel=mode, threads=torch.get_num_threads())  # fmt: skip
    tmp = Path(f"{args.out}.json.tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(f"{args.out}.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=("unet", "txt2img"), required=True)
    parser.add_argument("--impl", choices=("ldm", "diffusers"), required=True)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--latent", type=int, default=32, help="latent side (image: 8x)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True, help="path stem of the result files")
    worker(parser.parse_args())


if __name__ == "__main__":
    main()
