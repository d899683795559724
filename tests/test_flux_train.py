"""FLUX.1 LoRA fine-tuning with the flow objective (issue 22), end to end on a tiny FLUX-shaped
folder (tests/tiny_flux.py): the trainer's denoiser is the pipeline's (2 x 2 packing, t in
[0, 1]), its flow times are shifted as FluxPipeline samples the batch's size, FLUX.1-dev sees the
embedded guidance scale; on a one-image folder with cached latents and text embeddings, gradient
checkpointing and bf16 autocast the loss falls, a resumed run equals an uninterrupted one, and
the kohya file loads in diffusers' FluxPipeline with every pair injected and draws ldm's image.

Independent routes: diffusers' ``calculate_shift`` and ``FlowMatchEulerDiscreteScheduler.
time_shift`` for the shift, diffusers' FluxPipeline + ``load_lora_weights`` for the image.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from tiny_flux import SCHEDULER_DEV, make_tiny_flux

from ldm.train.lora import FLUX_TARGETS

CAPTION = "a red circle"
# 64 wide (4 heads of 16): the frozen proj_out then spans the 64 packed channels, so LoRA on
# the blocks can reach any velocity (32 wide, as tiny_flux's, spans half of them)
WIDE = dict(num_attention_heads=4)


def _start(tmp: Path, guidance_embeds: bool = True) -> Path:
    """The tiny FLUX folder with a near-zero VAE posterior std (the encoder's log-variance
    channels output -20), so an image's latents are fixed and the velocity is learnable."""
    from ldm.formats.diffusers_folder import load_folder, save_folder

    folder = make_tiny_flux(tmp / "diffusers", guidance_embeds, transformer=WIDE)
    parts = load_folder(folder)
    with torch.no_grad():
        conv = parts.vae.encoder.conv_out
        half = conv.out_channels // 2
        conv.weight[half:] = 0
        conv.bias[half:] = -20.0  # log-variance: std = e^-10
        # latents of unit std (the random VAE's are ~0.1): the image is then most of the
        # velocity eps - x0, and learning it halves the loss (a zero prediction gives 1 + |x0|^2)
        pixels = torch.from_numpy(np.asarray(_image(), np.float32) / 127.5 - 1).permute(2, 0, 1)
        std = parts.vae.encode(pixels[None], sample=False).std().item()
        parts.vae.config.scaling_factor /= std
    return save_folder(parts, tmp / "start")


def _image() -> Image.Image:
    image = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(image).ellipse((6, 6, 26, 26), fill="red")
    return image


def _data(tmp: Path) -> Path:
    """An image-caption folder (Hugging Face imagefolder) holding one 32 px image."""
    folder = tmp / "data"
    folder.mkdir()
    _image().save(folder / "a.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": CAPTION}))
    return folder


def _config(tmp: Path, start: Path, out: Path, steps: int = 30, *overrides: str, targets=None):
    from ldm.config import load_config
    from ldm.train.config import TrainConfig

    data = tmp / "data" if (tmp / "data").exists() else _data(tmp)
    path = tmp / "train.yaml"
    path.write_text(
        f"output_dir: {out}\nmodel: {{pretrained: {start}}}\n"
        f"data: {{source: {data}, resolution: 32, cache_latents: true, cache_text: true}}\n"
        "mixed_precision: bf16\ngradient_checkpointing: true\n"
        f"stages:\n  - {{name: lora, train: [transformer], method: lora, steps: {steps},\n"
        "     batch_size: 4, optim: {lr: 0.03}, loss: {min_snr_gamma: null},\n"
        "     ema: {enabled: false}, lora: {rank: 8, alpha: 8"
        + (f", targets: {json.dumps(targets)}" if targets else "")
        + "}}\nlog_every: 1\ncheckpoint_every: 10\nkeep_checkpoints: 5\n"
    )
    return load_config(TrainConfig, path, list(overrides))


def _train(cfg, resume=False) -> Path:
    from accelerate.state import AcceleratorState

    from ldm.train.loop import train

    # accelerate's state is process-wide: an earlier in-process run in this worker may have
    # fixed mixed_precision "no"; this one trains in bf16
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return train(cfg, progress=False, resume=resume)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _losses(run: Path) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


# ------------------------------------------------------------------ the pieces


def test_training_shift_is_flux_pipelines_dynamic_shift():
    """FLUX.1-dev's shift at a batch's size: diffusers' calculate_shift mu from the packed token
    count, then the scheduler's exponential time shift, on the same uniform draws."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from ldm.train.loss import flow_training_sigmas
    from ldm.train.step_loss import training_shift

    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", **SCHEDULER_DEV}
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_DEV)
    u = torch.rand(500, generator=torch.Generator().manual_seed(0)).clamp(1e-5, 1 - 1e-5)
    for h, w in ((64, 64), (128, 96)):  # latent sides: 1024 and 3072 image tokens
        mu = calculate_shift((h // 2) * (w // 2), 256, 4096, 0.5, 1.15)
        want = scheduler.time_shift(mu, 1.0, u.double())
        shift = training_shift(config, (1, 16, h, w), patch=2)
        got = flow_training_sigmas(500, torch.Generator().manual_seed(0), "uniform", shift=shift)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    static = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    assert training_shift(static, (1, 16, 64, 64), patch=2) == 3.0  # SD3: the static shift


def test_the_training_denoiser_is_the_pipelines(tmp_path):
    from ldm.formats.diffusers_folder import load_folder
    from ldm.models.flux_packing import PackedFlux
    from ldm.sampling.plan import make_denoiser
    from ldm.text.cond import Cond
    from ldm.train.config import StageConfig
    from ldm.train.step_loss import training_denoiser

    parts = load_folder(make_tiny_flux(tmp_path / "f"))
    stage = StageConfig(train=["transformer"], method="lora")
    stage.loss.min_snr_gamma = None
    ours = training_denoiser(parts.unet, parts, stage)
    assert isinstance(ours.network, PackedFlux) and ours.parametrisation.timestep_scale == 1.0
    theirs = make_denoiser(parts.unet, None, None, family=parts.family)
    c, g = parts.unet.config, torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    ctx = torch.randn(2, 5, c.joint_attention_dim, generator=g)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=g)
    cond = Cond(ctx, pooled, guidance=torch.full((2,), 3.5))
    with torch.no_grad():
        a, b = ours(x, torch.tensor([0.3, 0.8]), cond), theirs(x, torch.tensor([0.3, 0.8]), cond)
    assert torch.equal(a, b)


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_dev_trains_at_the_embedded_guidance_scale(guidance_embeds, tmp_path, monkeypatch):
    """Every transformer call of a FLUX.1-dev stage gets loss.embedded_guidance_scale per row;
    a schnell-style transformer (no guidance embedding) gets none."""
    from ldm.formats.safe_load import load_state_dict
    from ldm.models.flux import FluxTransformer2DModel

    seen, forward = [], FluxTransformer2DModel.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("guidance"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "forward", spy)
    start = _start(tmp_path, guidance_embeds)
    cfg = _config(tmp_path, start, tmp_path / "run", 2, "stages.0.loss.embedded_guidance_scale=2.0")
    _train(cfg)
    assert seen
    trained = load_state_dict(tmp_path / "run" / "lora-lora" / "pytorch_lora_weights.safetensors")
    for target in FLUX_TARGETS:  # diffusers' FLUX defaults, single blocks' q, k, v too
        assert f"transformer.transformer_blocks.0.{target}.lora_A.weight" in trained
    assert "transformer.single_transformer_blocks.0.attn.to_v.lora_A.weight" in trained
    for guidance in seen:
        if guidance_embeds:
            assert guidance is not None and torch.equal(guidance, torch.full((4,), 2.0))
        else:
            assert guidance is None


# ------------------------------------------------------------------ end to end


def test_flux_lora_learns_resumes_exactly_and_loads_in_diffusers(tmp_path):
    from diffusers import FluxPipeline

    from ldm.formats.diffusers_folder import load_folder
    from ldm.formats.lora import apply_lora
    from ldm.formats.safe_load import load_state_dict
    from ldm.pipeline import load_pipeline

    # the double block only: diffusers' kohya reader splits single blocks' linear1 at FLUX.1's
    # 3072 width (tests/test_flux_lora.py checks those names at that width)
    targets = [f"transformer_blocks.0.{t}" for t in FLUX_TARGETS]
    start = _start(tmp_path)
    run = tmp_path / "run"
    final = _train(_config(tmp_path, start, run, targets=targets))
    losses = _losses(run)
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # a prediction that ignores the image (zero) has loss E|eps - x0|^2 = 1 + E[x0^2]: ending
    # below it means the LoRA learned the image, not only to silence the random network
    pixels = torch.from_numpy(np.asarray(_image(), np.float32) / 127.5 - 1).permute(2, 0, 1)
    x0 = load_folder(start).vae.encode(pixels[None], sample=False)
    blind = 1 + (x0**2).mean().item()
    assert last < 0.9 * first and last < 0.95 * blind, (first, last, blind)
    lora = run / "lora-lora"
    kohya, peft = lora / "lora_kohya.safetensors", lora / "pytorch_lora_weights.safetensors"
    trained = {k.removeprefix("transformer.").removesuffix(".lora_A.weight")
               for k in load_state_dict(peft) if k.endswith(".lora_A.weight")}  # fmt: skip
    assert {n.split(".")[-1] for n in trained} >= {"to_add_out", "add_q_proj", "0", "2"}
    for path in (kohya, peft):  # both files fit the start model, every key applied
        assert not apply_lora(load_folder(start), path).warning()

    # a LoRA stage's checkpoint holds the LoRA, not the frozen transformer, T5, CLIP and VAE
    mid = run / "checkpoints" / "step-00000020"
    assert {f.name for f in mid.glob("*.safetensors")} <= {
        "unet.safetensors",
        "ema-unet.safetensors",
    }
    assert all(".lora_" in k for k in load_state_dict(mid / "unet.safetensors"))
    # resume from the checkpoint after step 20: the same merged weights
    reference = load_folder(final).unet.state_dict()
    shutil.rmtree(final)
    for ckpt in (run / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > 20:
            shutil.rmtree(ckpt)
    cfg = _config(tmp_path, start, run, targets=targets)
    resumed = load_folder(_train(cfg, resume=True)).unet.state_dict()
    worst = max((resumed[k] - v).abs().max().item() for k, v in reference.items())
    assert worst <= 1e-6, worst

    # diffusers: the start folder + ldm's kohya file = ldm's merged export, every pair injected
    settings = dict(height=32, width=32, guidance_scale=3.5)
    (out,) = load_pipeline(final)([CAPTION], [1], steps=3, **settings)
    ours = np.asarray(out.image, dtype=np.int16)
    pipe = FluxPipeline.from_pretrained(start)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(kohya))
    injected = {n.removesuffix(".base_layer") for n, _ in pipe.transformer.named_modules()
                if n.endswith(".base_layer")}  # fmt: skip
    assert injected == trained
    image = pipe(CAPTION, num_inference_steps=3, generator=torch.Generator().manual_seed(1),
                 **settings).images[0]  # fmt: skip
    diff = np.abs(np.asarray(image, dtype=np.int16) - ours).max()
    assert diff <= 2, diff
    base = load_pipeline(start)([CAPTION], [1], steps=3, **settings)[0]
    assert np.abs(np.asarray(base.image, dtype=np.int16) - ours).max() > 2  # the LoRA counts
