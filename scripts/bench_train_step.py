"""Training-step time of model configs, alternated in one process (best of rounds): the CPU
budget per step that issue 21's comparison equalises (eps U-Net, flow U-Net, MMDiT;
docs/benchmarks.md).

    OMP_NUM_THREADS=1 python scripts/bench_train_step.py configs/models/shapes64.yaml \
        configs/models/shapes64-mmdit.yaml --batch 64 --rounds 3 --steps 4
"""

from __future__ import annotations

import argparse
import time

import torch


def setup(path: str, batch: int):
    from ldm import accel
    from ldm.models.build import build_model, load_model_config
    from ldm.train.conditioning import TrainingText
    from ldm.train.config import LossConfig, StageConfig
    from ldm.train.step_loss import training_denoiser

    parts = build_model(load_model_config(path))
    # as the trainer does with the demo recipe (accel auto, bf16, NCHW)
    accel.apply(parts.unet, "auto", device=torch.device("cpu"), dtype=torch.bfloat16, training=True)
    parts.unet.to(memory_format=torch.contiguous_format)
    trained = {"unet": parts.unet}
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(parts, name, None) is not None:
            trained[name] = getattr(parts, name)
    for m in trained.values():
        m.train()
    stage = StageConfig(train=["unet"], loss=LossConfig(min_snr_gamma=None))
    den = training_denoiser(parts.unet, parts, stage)
    text = TrainingText(parts, trained, trained)
    params = [p for m in trained.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    c = parts.unet.config
    shape = (batch, c.in_channels, 16, 16)
    captions = ["a purple circle above a orange square"] * batch
    return den, text, opt, shape, captions


def step(den, text, opt, shape, captions) -> None:
    x0, noise = torch.randn(shape), torch.randn(shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cond = text(captions, [False] * len(captions), [None] * len(captions), "cpu")
        if den.continuous:
            loss = den.loss(x0, noise, torch.rand(shape[0]), cond).mean()
        else:
            t = torch.randint(0, 1000, (shape[0],))
            loss = den.loss(x0, noise, den.sigmas[t], cond, t=t).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    runs = {p: setup(p, args.batch) for p in args.configs}
    times = {p: [] for p in args.configs}
    for p in args.configs:  # warm-up
        step(*runs[p])
    for _ in range(args.rounds):
        for p in args.configs:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(*runs[p])
            times[p].append((time.perf_counter() - t0) / args.steps)
    base = min(times[args.configs[0]])
    for p in args.configs:
        m = min(times[p])
        print(f"{p}: {m:.3f} s/step (best of {args.rounds}), {m / base:.2f}x the first")


if __name__ == "__main__":
    main()
