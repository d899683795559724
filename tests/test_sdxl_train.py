"""SDXL fine-tuning end to end on a tiny SDXL-shaped model: buckets -> time ids, zeroed caption
dropout, LoRA on the U-Net and both text encoders, caches, exact resume, diffusers loads the
export. Reference numbers come from diffusers (encode_prompt, _get_add_time_ids, its U-Net)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train" / "tiny-sdxl.yaml"
SIZES = [(40, 24), (24, 40), (32, 32), (48, 30), (30, 48), (36, 36)]  # (W, H): several buckets
COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 200, 60)}


def _folder(root: Path) -> Path:
    """kohya-style folder: img.png + img.txt, a colour word per image, sizes of SIZES."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i, (w, h) in enumerate(SIZES):
        name = names[i % len(names)]
        y, x = np.mgrid[0:h, 0:w]
        disc = ((x - w / 2) ** 2 + (y - h / 2) ** 2) < (min(w, h) / 3) ** 2  # (H, W)
        pixels = np.full((h, w, 3), 128, np.uint8)
        pixels[disc] = COLOURS[name]
        Image.fromarray(pixels).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a {name} disc")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _folder(tmp_path_factory.mktemp("sdxl_data"))


def _cfg(out: Path, base: Path, data: Path, *extra: str):
    from ldm.config import load_config
    from ldm.train.config import TrainConfig

    overrides = [f"output_dir={out}", f"model.pretrained={base}", f"data.source={data}", *extra]
    return load_config(TrainConfig, CONFIG, overrides)


def _diffusers_pipe(path: Path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True).to("cpu")


# --- data: sizes and crops ---------------------------------------------------------------------


def test_a_mirrored_crop_reports_its_left_edge_in_the_mirrored_image():
    """size_conditioning's crop is where the window sits in the image the network sees."""
    from ldm.data.images import CropParams, apply_crop

    w, h = 20, 12
    y, x = np.mgrid[0:h, 0:w]
    coded = np.stack([x * 10, y * 10, np.zeros_like(x)], -1).astype(np.uint8)  # R = x, G = y
    image = Image.fromarray(coded)
    for flip in (False, True):
        params = CropParams((8, 6), (w, h), 3, 4, flip, (w, h))  # no resize: pixels stay exact
        crop = np.asarray(apply_crop(image, params))
        seen = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image
        original, (top, left), target = params.size_conditioning()
        assert original == (h, w) and target == (6, 8)
        window = np.asarray(seen.crop((left, top, left + 8, top + 6)))
        assert np.array_equal(window, crop), (flip, top, left)


def test_bucket_batches_carry_each_images_original_size_and_crop(data):
    from ldm.train.config import DataConfig
    from ldm.train.folder_batches import FolderBatches

    cfg = DataConfig(source=str(data), resolution=32, buckets=True, bucket_steps=8,
                     bucket_min=16, bucket_max=64, center_crop=True)  # fmt: skip
    batches = FolderBatches(cfg, batch_size=2, seed=0, rank=0, world=1)
    files = {Image.open(p).size: p for p in data.glob("*.png")}
    seen = set()
    for step in range(6):
        b = batches.batch(step)
        h, w = b.pixels.shape[-2:]
        for original, (top, left), target in b.sizes:
            oh, ow = original
            assert (ow, oh) in files and target == (h, w)
            scale = max(w / ow, h / oh)  # cover the bucket, then centre-crop
            rw, rh = max(w, round(ow * scale)), max(h, round(oh * scale))
            assert abs(top - (rh - h) / 2) <= 1 and abs(left - (rw - w) / 2) <= 1
            seen.add((ow, oh))
    assert len({b.pixels.shape for b in [batches.batch(s) for s in range(6)]}) > 1  # buckets
    assert seen == set(SIZES)


# --- conditioning: against diffusers ------------------------------------------------------------


def test_training_cond_equals_diffusers_and_dropout_zeroes_both_encoders(tiny_sdxl):
    from ldm.loading import load_model
    from ldm.train.conditioning import TrainingText

    parts = load_model(tiny_sdxl, device="cpu", dtype=torch.float32)
    text = TrainingText(parts, trained={}, wrapped={})
    sizes = [((30, 48), (0, 4), (24, 40)), ((36, 36), (2, 0), (32, 32))]
    with torch.no_grad():
        cond = text(["a red disc", "a blue disc"], [False, True], sizes, torch.device("cpu"))
    pipe = _diffusers_pipe(tiny_sdxl)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("a red disc", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.context[0], embeds[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.pooled[0], pooled[0], rtol=1e-5, atol=1e-5)
    assert not cond.context[1].any() and not cond.pooled[1].any()  # dropped: zeros, both parts
    for row, (original, crop, target) in enumerate(sizes):
        ids = pipe._get_add_time_ids(original, crop, target, torch.float32, 32)
        torch.testing.assert_close(cond.time_ids[row], ids[0])


def test_trained_encoders_are_called_through_their_accelerate_wrappers(tiny_sdxl):
    """Under DDP only the prepared wrapper's forward syncs gradients: the Cond must call it."""
    from ldm.loading import load_model
    from ldm.train.conditioning import TrainingText

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    parts = load_model(tiny_sdxl, device="cpu", dtype=torch.float32)
    parts.text_encoder_2.requires_grad_(True)  # as set_trainable leaves a trained part
    wrapper = Wrapper(parts.text_encoder_2)
    trained = {"text_encoder_2": parts.text_encoder_2}
    text = TrainingText(parts, trained=trained, wrapped={"text_encoder_2": wrapper})
    sizes = [((32, 32), (0, 0), (32, 32))]
    cond = text(["a red disc"], [False], sizes, torch.device("cpu"))
    assert wrapper.calls == 1 and cond.pooled.requires_grad


def test_refiner_dropout_encodes_the_empty_prompt_and_ids_carry_the_score(
    tiny_sdxl_refiner, data, tmp_path
):
    """The refiner (force_zeros_for_empty_prompt false): a dropped caption is the empty prompt
    encoded, as diffusers' uncond is; 5 ids end in the aesthetic score; a LoRA run exports a
    folder diffusers' img2img pipeline loads and runs."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from ldm.loading import load_model
    from ldm.train.conditioning import TrainingText
    from ldm.train.loop import train

    parts = load_model(tiny_sdxl_refiner, device="cpu", dtype=torch.float32)
    text = TrainingText(parts, trained={}, wrapped={}, aesthetic_score=2.5)
    sizes = [((30, 48), (0, 4), (24, 40))] * 2
    with torch.no_grad():
        cond = text(["a red disc", "a blue disc"], [False, True], sizes, torch.device("cpu"))
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        tiny_sdxl_refiner, local_files_only=True
    )
    with torch.no_grad():
        embeds, empty, pooled, empty_pooled = pipe.encode_prompt("a red disc")
    torch.testing.assert_close(cond.context, torch.cat([embeds, empty]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.pooled, torch.cat([pooled, empty_pooled]), rtol=1e-5, atol=1e-5)
    assert cond.time_ids.tolist() == [[30.0, 48.0, 0.0, 4.0, 2.5]] * 2

    final = train(
        _cfg(tmp_path / "run", tiny_sdxl_refiner, data, "stages.0.steps=2"), progress=False
    )
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(final, local_files_only=True)
    image = refiner("a red disc", image=torch.rand(1, 3, 32, 32), num_inference_steps=2,
                    strength=0.5, output_type="np").images[0]  # fmt: skip
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


# --- training -----------------------------------------------------------------------------------


def _diffusers_eval_loss(folder: Path, data: Path) -> float:
    """eps-MSE of a diffusers SDXL folder on the bucketed crops, fixed noise and timesteps."""
    from diffusers import DDPMScheduler

    from ldm.train.config import DataConfig
    from ldm.train.folder_batches import FolderBatches

    pipe = _diffusers_pipe(folder)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    cfg = DataConfig(source=str(data), resolution=32, buckets=True, bucket_steps=8,
                     bucket_min=16, bucket_max=64, center_crop=True)  # fmt: skip
    batches = FolderBatches(cfg, batch_size=2, seed=0, rank=0, world=1)
    g = torch.Generator().manual_seed(0)
    total, count = 0.0, 0
    with torch.no_grad():
        for step in range(3):  # one epoch: three buckets of two images
            b = batches.batch(step)
            latents = pipe.vae.encode(b.pixels).latent_dist.mean * pipe.vae.config.scaling_factor
            embeds, _, pooled, _ = pipe.encode_prompt(b.captions, do_classifier_free_guidance=False)
            ids = torch.cat([pipe._get_add_time_ids(*s, torch.float32, 32) for s in b.sizes])
            for t in (100, 400, 700):
                noise = torch.randn(latents.shape, generator=g)
                timesteps = torch.full((len(latents),), t)
                noisy = scheduler.add_noise(latents, noise, timesteps)
                out = pipe.unet(
                    noisy,
                    timesteps,
                    embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
                ).sample
                total += torch.nn.functional.mse_loss(out, noise).item()
                count += 1
    return total / count


def test_full_finetune_with_caches_lowers_diffusers_loss(tiny_sdxl, data, tmp_path):
    """Full U-Net fine-tune from cached latents and cached text: the export's loss, measured by
    diffusers on the training crops, is below the base model's; the caches were used."""
    from ldm.train.loop import train

    cfg = _cfg(tmp_path / "run", tiny_sdxl, data, "stages.0.method=full", "stages.0.steps=24",
               "stages.0.lora.text_encoder=false", "data.cache_latents=true",
               "data.cache_text=true", "data.center_crop=true", "checkpoint_every=100")  # fmt: skip
    final = train(cfg, progress=False)
    cache = tmp_path / "run" / "cache"
    assert len(list((cache / "latents").rglob("*.safetensors"))) == 2 * len(SIZES)  # both flips
    assert len(list((cache / "text").rglob("*.safetensors"))) == len(COLOURS) + 1  # and ""
    before, after = _diffusers_eval_loss(tiny_sdxl, data), _diffusers_eval_loss(final, data)
    assert after < 0.8 * before, (before, after)


def test_lora_on_unet_and_both_text_encoders_exports_what_diffusers_loads(
    tiny_sdxl, data, tmp_path
):
    """kohya te1/te2 names in the LoRA file; the merged export loads in diffusers, generates,
    and its U-Net equals diffusers' base U-Net with the diffusers-format LoRA file loaded."""
    from ldm.train.loop import train

    final = train(_cfg(tmp_path / "run", tiny_sdxl, data), progress=False)
    lora_dir = tmp_path / "run" / "lora-sdxl"
    kohya = load_file(str(lora_dir / "lora_kohya.safetensors"))
    prefixes = {k.split("_")[1] for k in kohya}
    assert prefixes == {"unet", "te1", "te2"}, prefixes

    pipe = _diffusers_pipe(final)
    g = torch.Generator().manual_seed(0)
    image = pipe("a red disc", num_inference_steps=2, height=32, width=32, generator=g,
                 output_type="np").images[0]  # fmt: skip
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()

    base = _diffusers_pipe(tiny_sdxl)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 12, generator=g), torch.randn(2, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g),
             "time_ids": torch.tensor([[24.0, 40, 0, 4, 16, 24]] * 2)}  # fmt: skip
    t = torch.tensor([500, 20])
    with torch.no_grad():
        plain = base.unet(x, t, ctx, added_cond_kwargs=added).sample
        base.load_lora_weights(str(lora_dir), weight_name="pytorch_lora_weights.safetensors")
        want = base.unet(x, t, ctx, added_cond_kwargs=added).sample
        got = pipe.unet(x, t, ctx, added_cond_kwargs=added).sample
    assert (want - plain).abs().max() > 1e-4  # the LoRA moved the U-Net: the check means something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        want_text = base.encode_prompt("a red disc", do_classifier_free_guidance=False)
        got_text = pipe.encode_prompt("a red disc", do_classifier_free_guidance=False)
    torch.testing.assert_close(got_text[0], want_text[0], rtol=1e-4, atol=1e-4)  # both TEs
    torch.testing.assert_close(got_text[2], want_text[2], rtol=1e-4, atol=1e-4)  # pooled (TE2)


def test_bf16_gradient_checkpointing_full_text_encoder_training(tiny_sdxl, data, tmp_path):
    """Mixed precision (accelerate bf16 autocast) with gradient checkpointing on the U-Net and
    the second text encoder, trained in full: finite, changed weights."""
    from accelerate.state import AcceleratorState

    from ldm.formats.diffusers_folder import load_folder
    from ldm.train.loop import train

    overrides = ["stages.0.method=full", "stages.0.train=[unet,text_encoder_2]",
                 "stages.0.lora.text_encoder=false", "stages.0.steps=2", "mixed_precision=bf16",
                 "gradient_checkpointing=true"]  # fmt: skip
    cfg = _cfg(tmp_path / "run", tiny_sdxl, data, *overrides)
    AcceleratorState._reset_state(reset_partial_state=True)  # process-wide: others use "no"
    try:
        final = train(cfg, progress=False)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    start, parts = load_folder(tiny_sdxl), load_folder(final)
    for name in ("unet", "text_encoder_2"):
        new, old = getattr(parts, name).state_dict(), getattr(start, name).state_dict()
        assert all(torch.isfinite(v).all() for v in new.values())
        assert any(not torch.equal(new[k], old[k]) for k in old), name
    te1 = parts.text_encoder.state_dict()
    assert all(torch.equal(v, te1[k]) for k, v in start.text_encoder.state_dict().items())


# --- exact resume -------------------------------------------------------------------------------


def _train_proc(out: Path, base: Path, data: Path, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ldm", "train", "--config", str(CONFIG), f"output_dir={out}",
           f"model.pretrained={base}", f"data.source={data}", "checkpoint_every=1",
           "--no-progress"] + (["--resume"] if resume else [])  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _final(run: Path) -> dict[str, torch.Tensor]:
    files = {
        "unet": "unet/diffusion_pytorch_model.safetensors",
        "te1": "text_encoder/model.safetensors",
        "te2": "text_encoder_2/model.safetensors",
    }
    return {f"{p}/{k}": v for p, f in files.items()
            for k, v in load_file(str(run / "final" / f)).items()}  # fmt: skip


def test_sigkill_then_resume_equals_uninterrupted(tiny_sdxl, data, tmp_path):
    """LoRA on U-Net + both text encoders, random crops and flips, dropout: killed mid-stage
    and resumed, the export equals an uninterrupted run's."""
    from test_train import _wait_for

    ref = _train_proc(tmp_path / "ref", tiny_sdxl, data)
    run = tmp_path / "killed"
    proc = _train_proc(run, tiny_sdxl, data)
    _wait_for(run / "checkpoints" / "step-00000003", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()[-2000:]
    proc = _train_proc(run, tiny_sdxl, data, resume=True)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]
    a, b = _final(tmp_path / "ref"), _final(run)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.cache_text=true"], "cache_text: the text encoders train"),  # LoRA on both TEs
        (["data.cache_latents=true"], "cache_latents: needs data.center_crop"),
        (["stages.0.train=[unet,text_encoder_3]"], "unknown part 'text_encoder_3'"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_training(
    tiny_sdxl, data, tmp_path, overrides, message
):
    from ldm.errors import ConfigError
    from ldm.train.loop import train

    with pytest.raises(ConfigError, match=message):
        train(_cfg(tmp_path / "run", tiny_sdxl, data, *overrides), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
