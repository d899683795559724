"""Training with the flow objective (issue 21): the flow times and weights against their
closed forms, the velocity target, and a tiny flow U-Net trained end to end (loss falls, a
resumed run equals an uninterrupted one, the export loads in diffusers)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from ldm.denoiser import Denoiser
from ldm.train.loss import flow_loss_weight, flow_training_sigmas

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny.yaml"


def _ks_distance(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov statistic of samples against a closed-form CDF."""
    x = samples.double().sort().values
    n = len(x)
    f = cdf(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    lower = f - torch.arange(0, n, dtype=torch.float64) / n
    return max(upper.max().item(), lower.max().item())


def test_logit_normal_sigmas_follow_the_papers_density():
    """sigma = sigmoid(u), u ~ N(m, s): P(sigma <= x) = Phi((logit x - m) / s) (SD3 eq. 19)."""
    g = torch.Generator().manual_seed(0)
    m, s = 0.5, 0.8
    sig = flow_training_sigmas(20000, g, "logit_normal", mean=m, std=s)

    def cdf(x):
        z = (torch.log(x / (1 - x)) - m) / s
        return 0.5 * (1 + torch.erf(z / math.sqrt(2)))

    assert _ks_distance(sig, cdf) < 0.015  # the 1% critical value for n = 20000 is 0.0115
    assert _ks_distance(flow_training_sigmas(20000, g, "uniform"), lambda x: x) < 0.015


def test_mode_sigmas_and_the_static_shift_are_the_papers_maps():
    """Mode sampling is f_mode(u) of uniform u (eq. 20), the shift s t / (1 + (s - 1) t)
    (eq. 23): drawn with the same generator state, the maps apply to the same u."""
    u = torch.rand(1000, generator=torch.Generator().manual_seed(3))
    scale = 1.29
    mode = 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    got = flow_training_sigmas(1000, torch.Generator().manual_seed(3), "mode", mode_scale=scale)
    torch.testing.assert_close(got, mode.clamp(1e-5, 1 - 1e-5), rtol=0, atol=1e-6)
    shifted = flow_training_sigmas(1000, torch.Generator().manual_seed(3), "uniform", shift=3.0)
    t = u.clamp(1e-5, 1 - 1e-5)
    torch.testing.assert_close(shifted, 3 * t / (1 + 2 * t), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sigma sampling"):
        flow_training_sigmas(4, torch.Generator(), "cosine")


def test_flow_loss_weights():
    sigma = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(flow_loss_weight(sigma), torch.ones(3))
    torch.testing.assert_close(flow_loss_weight(sigma, "sigma_sqrt"), 1 / sigma**2)
    cosmap = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    torch.testing.assert_close(flow_loss_weight(sigma, "cosmap"), cosmap)


def test_flow_target_is_the_velocity_and_the_loss_its_error():
    """x_t = (1 - t) x0 + t eps, target eps - x0 (SD3 eq. 1-3), the network sees t * 1000."""
    seen = {}

    def network(x_in, t, **kwargs):
        seen["x_in"], seen["t"] = x_in, t
        return torch.zeros_like(x_in)

    den = Denoiser(network, None, prediction="flow")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.25, 0.75])
    loss = den.loss(x0, eps, sigma, _cond(2))
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_in"], (1 - s) * x0 + s * eps)
    torch.testing.assert_close(seen["t"], sigma * 1000)
    torch.testing.assert_close(loss, ((eps - x0) ** 2).mean(dim=(1, 2, 3)))  # zero prediction


def _cond(n: int):
    from ldm.text.cond import Cond

    return Cond(torch.zeros(n, 3, 8))


# ------------------------------------------------------------------ a tiny flow U-Net, trained


def _start_model(tmp: Path) -> Path:
    """The tiny model with a FlowMatch scheduler, saved as a folder to fine-tune. Its random VAE
    gets a near-zero posterior std, so that the latents of an image are fixed and a flow U-Net
    can learn their velocity (with std ~1, x0 would be noise and the loss could not fall)."""
    from ldm.formats.diffusers_folder import save_folder
    from ldm.models.build import build_model, load_model_config

    cfg = load_model_config(ROOT / "configs/models/tiny.yaml")
    cfg.scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
    parts = build_model(cfg, seed=0)
    with torch.no_grad():
        half = parts.vae.quant_conv.out_channels // 2
        parts.vae.quant_conv.weight[half:] = 0
        parts.vae.quant_conv.bias[half:] = -20.0  # log-variance: std = e^-10
    return save_folder(parts, tmp / "start")


def _flow_config(tmp: Path, out: Path, *overrides: str):
    """One diffusion stage on the start model, on a single shapes image, min-SNR off."""
    from ldm.config import load_config
    from ldm.train.config import TrainConfig

    start = tmp / "start" if (tmp / "start").exists() else _start_model(tmp)
    path = tmp / "train.yaml"
    path.write_text(
        f"output_dir: {out}\nmodel: {{pretrained: {start}}}\n"
        "data: {source: shapes, resolution: 32, cache_latents: true, cache_size: 1}\n"
        "stages:\n  - {name: diffusion, train: [unet], steps: 30, batch_size: 8,\n"
        "     optim: {lr: 0.003}, loss: {min_snr_gamma: null}, ema: {enabled: false}}\n"
        "log_every: 1\ncheckpoint_every: 10\nkeep_checkpoints: 5\n"
    )
    return load_config(TrainConfig, path, list(overrides))


def _train(cfg, resume=False):
    from ldm.train.loop import train

    return train(cfg, progress=False, resume=resume)


def _losses(run: Path, stage: str) -> list[float]:
    import csv

    with open(run / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["stage"] == stage]


def test_a_tiny_flow_unet_learns_resumes_exactly_and_loads_in_diffusers(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

    from ldm.formats.diffusers_folder import load_folder
    from ldm.sampling.plan import is_flow

    run = tmp_path / "run"
    final = _train(_flow_config(tmp_path, run))
    losses = _losses(run, "diffusion")
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)

    # resume from the checkpoint after step 20 (its folder counts steps done): the same weights
    reference = load_folder(final).unet.state_dict()
    shutil.rmtree(final)
    for ckpt in (run / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > 20:
            shutil.rmtree(ckpt)
    resumed = load_folder(_train(_flow_config(tmp_path, run), resume=True))
    worst = max((resumed.unet.state_dict()[k] - v).abs().max().item() for k, v in reference.items())
    assert worst <= 1e-6, worst

    # the export is a diffusers flow model: its scheduler, and its U-Net gives ours
    assert is_flow(resumed.scheduler_config)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(final / "scheduler")
    assert scheduler.config.num_train_timesteps == 1000
    theirs = UNet2DConditionModel.from_pretrained(final / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        want = theirs(x, torch.tensor([500.0]), encoder_hidden_states=ctx).sample
        got = resumed.unet(x, torch.tensor([500.0]), encoder_hidden_states=ctx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_flow_training_refuses_discrete_only_settings(tmp_path):
    from ldm.errors import ConfigError

    cfg = _flow_config(tmp_path, tmp_path / "a", "stages.0.loss.min_snr_gamma=5.0")
    with pytest.raises(ConfigError, match="min_snr_gamma: set it to null for a flow model"):
        _train(cfg)
    cfg = _flow_config(tmp_path, tmp_path / "b", "stages.0.loss.prediction_type=epsilon")
    with pytest.raises(ConfigError, match="prediction_type: a flow model predicts velocity"):
        _train(cfg)


def test_model_scheduler_overrides_the_export_and_training_shift_the_training_times(
    tmp_path, monkeypatch
):
    """model.scheduler replaces keys of the start model's scheduler config (kept in the export:
    the shift it samples with); loss.training_shift trains at another shift, and without it the
    training times take the (replaced) scheduler's."""
    import json

    import ldm.train.step_loss as step_loss
    from ldm.errors import ConfigError

    seen = []
    real = step_loss.flow_training_sigmas

    def spy(n, g, sampling, mean, std, mode_scale, shift):
        seen.append(shift)
        return real(n, g, sampling, mean, std, mode_scale, shift)

    monkeypatch.setattr(step_loss, "flow_training_sigmas", spy)
    common = ("stages.0.steps=2", "model.scheduler.shift=3.0")
    final = _train(
        _flow_config(tmp_path, tmp_path / "a", *common, "stages.0.loss.training_shift=1.0")
    )
    assert json.loads((final / "scheduler/scheduler_config.json").read_text())["shift"] == 3.0
    assert seen == [1.0, 1.0]
    seen.clear()
    _train(_flow_config(tmp_path, tmp_path / "b", *common))
    assert seen == [3.0, 3.0]

    with pytest.raises(
        ConfigError, match="model.scheduler: shfit is not a key of the model's scheduler config"
    ):
        _train(_flow_config(tmp_path, tmp_path / "c", "model.scheduler.shfit=3.0"))
    with pytest.raises(ConfigError, match="model.scheduler.shift: a positive number"):
        _train(_flow_config(tmp_path, tmp_path / "e", "model.scheduler.shift=-1"))
    cfg = _flow_config(tmp_path, tmp_path / "d", "stages.0.loss.training_shift=0")
    with pytest.raises(ConfigError, match="training_shift: a positive number, for a flow model"):
        _train(cfg)


# ------------------------------------------------------------------ a tiny MMDiT, trained

TINY_MMDIT = """
name: tiny-mmdit
transformer: {sample_size: 8, patch_size: 2, in_channels: 4, out_channels: 4, num_layers: 2,
  attention_head_dim: 8, num_attention_heads: 2, joint_attention_dim: 32,
  caption_projection_dim: 16, pooled_projection_dim: 32, pos_embed_max_size: 8,
  qk_norm: rms_norm}
text_encoder: {hidden_size: 16, intermediate_size: 32, num_attention_heads: 2,
  num_hidden_layers: 2, projection_dim: 16, hidden_act: quick_gelu}
text_encoder_2: {hidden_size: 16, intermediate_size: 32, num_attention_heads: 2,
  num_hidden_layers: 2, projection_dim: 16, hidden_act: gelu}
scheduler: {_class_name: FlowMatchEulerDiscreteScheduler, num_train_timesteps: 1000, shift: 1.0}
defaults: {max_sequence_length: 1}
"""


def _mmdit_start(tmp: Path) -> Path:
    """A tiny SD3-family model built from a model config (two CLIPs, no T5), with the tiny
    U-Net model's autoencoder at near-zero posterior std (see _start_model)."""
    import yaml

    from ldm.models.build import build_model, load_model_config
    from ldm.train.model import export_model

    vae = yaml.safe_load((ROOT / "configs/models/tiny.yaml").read_text())["vae"]
    text = TINY_MMDIT + "vae: " + yaml.safe_dump(vae, default_flow_style=True)
    (tmp / "tiny-mmdit.yaml").write_text(text)
    parts = build_model(load_model_config(tmp / "tiny-mmdit.yaml"), seed=0)
    with torch.no_grad():
        half = parts.vae.quant_conv.out_channels // 2
        parts.vae.quant_conv.weight[half:] = 0
        parts.vae.quant_conv.bias[half:] = -20.0
    export_model(parts, tmp / "mmdit-start", "fp32")
    return tmp / "mmdit-start"


def test_a_tiny_mmdit_trains_with_flow_and_its_export_is_a_diffusers_sd3_model(tmp_path):
    """The transformer trains through the same loss (stage part "transformer"); the export,
    with its one-token T5 block stored in ldm_model.json, is an SD3 folder diffusers runs."""
    import json

    import numpy as np
    from diffusers import StableDiffusion3Pipeline

    from ldm.config import load_config
    from ldm.pipeline import load_pipeline
    from ldm.train.config import TrainConfig

    start = _mmdit_start(tmp_path)
    path = tmp_path / "train.yaml"
    path.write_text(
        f"output_dir: {tmp_path / 'run'}\nmodel: {{pretrained: {start}}}\n"
        "data: {source: shapes, resolution: 32, cache_latents: true, cache_size: 1}\n"
        "stages:\n  - {name: diffusion, train: [transformer, text_encoder, text_encoder_2],\n"
        "     steps: 60, batch_size: 8, optim: {lr: 0.003}, loss: {min_snr_gamma: null},\n"
        "     ema: {enabled: false}}\nlog_every: 1\ncheckpoint_every: 100\n"
    )
    final = _train(load_config(TrainConfig, path, []))
    losses = _losses(tmp_path / "run", "diffusion")
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    manifest = json.loads((final / "ldm_model.json").read_text())
    assert manifest["defaults"] == {"max_sequence_length": 1}

    pipe = load_pipeline(final)
    assert pipe.parts.family.name == "sd3" and pipe.max_sequence_length == 1
    settings = dict(steps=4, guidance_scale=4.0, height=32, width=32)
    (out,) = pipe(["a red circle"], [3], **settings)
    theirs = StableDiffusion3Pipeline.from_pretrained(final, text_encoder_3=None, tokenizer_3=None)
    theirs.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    want = theirs("a red circle", num_inference_steps=4, guidance_scale=4.0, height=32, width=32,
                  max_sequence_length=1, generator=g).images[0]  # fmt: skip
    diff = np.abs(np.asarray(out.image, dtype=int) - np.asarray(want, dtype=int)).max()
    assert diff <= 2, diff
