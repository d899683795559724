"""LCM-LoRA files on the tiny SD folder: the diffusers/PEFT form (what diffusers'
train_lcm_distill_lora_sd_wds.py saves: ``get_peft_model_state_dict`` through
``save_lora_weights``) and the kohya form (``lora_unet_<path>`` with alpha, as the published
LCM-LoRA files and A1111/ComfyUI use), loaded in ldm and in diffusers, for SD 1.x and SDXL (whose
published LCM-LoRA names diffusers' module paths in kohya keys, not sgm's).

Weights: ldm's merged U-Net equals diffusers' fused one. Images: the ``lcm`` sampler with the LoRA
equals diffusers' StableDiffusionPipeline with LCMScheduler and the same LoRA (fused or not).
The files come from peft and diffusers' own kohya converter, never from ldm's writers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.formats.diffusers_folder import load_folder
from ldm.formats.lora import apply_lora, load_lora
from ldm.formats.safe_load import load_state_dict, save_state_dict

# the LCM-LoRA script's targets (every Linear/Conv of the U-Net's blocks, time_emb_proj included)
LCM_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]  # fmt: skip
RANK, ALPHA = 4, 8.0  # alpha != rank: both readers must apply alpha / rank = 2
SIZE, SEED, PROMPT = 32, 1234, "a red circle above a blue square"


def _peft_state(folder: Path, seed: int = 7) -> tuple[dict[str, torch.Tensor], dict]:
    """A random LCM-shaped LoRA trained-by-peft state dict for the folder's U-Net (unprefixed
    ``<path>.lora_A.weight`` keys, as get_peft_model_state_dict gives) and its peft config."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LCM_TARGETS)
    inject_adapter_in_model(config, unet)
    state = get_peft_model_state_dict(unet)
    gen = torch.Generator().manual_seed(seed)
    for key, value in state.items():  # peft zeroes lora_B: a random, small update instead
        fan_in = value.shape[1] * (value[0, 0].numel() if value.ndim == 4 else 1)
        size = 0.3 / fan_in**0.5 if ".lora_B." in key else 1.0 / fan_in**0.5
        state[key] = size * torch.randn(value.shape, generator=gen)
    return state, config.to_dict()


def _diffusers_file(state: dict, config: dict, out: Path) -> Path:
    """The file diffusers' LCM-LoRA script writes: ``unet.``-prefixed PEFT keys, alpha in the
    adapter metadata."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=state, unet_lora_adapter_metadata=config
    )
    return out / "pytorch_lora_weights.safetensors"


def _kohya_file(state: dict, path: Path) -> Path:
    """The same pairs in kohya's layout by diffusers' own PEFT -> kohya converter, with the alpha
    the PEFT file keeps in its metadata (the converter writes alpha = rank)."""
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    kohya = {k: torch.tensor(ALPHA) if k.endswith(".alpha") else v for k, v in kohya.items()}
    save_state_dict(kohya, path)
    return path


def _lora_files(folder: Path, out: Path) -> dict[str, Path]:
    state, config = _peft_state(folder)
    return {
        "diffusers": _diffusers_file(state, config, out / "peft"),
        "kohya": _kohya_file(state, out / "lcm_lora_kohya.safetensors"),
    }


@pytest.fixture(scope="module")
def files(tiny_sd1, tmp_path_factory) -> dict[str, Path]:
    return _lora_files(tiny_sd1, tmp_path_factory.mktemp("lcm_lora"))


@pytest.fixture(scope="module")
def sdxl_files(tiny_sdxl, tmp_path_factory) -> dict[str, Path]:
    """The published SDXL LCM-LoRA's layout: kohya keys on diffusers' paths, not sgm's."""
    return _lora_files(tiny_sdxl, tmp_path_factory.mktemp("lcm_lora_xl"))


def _setup(request, kind: str, form: str) -> tuple[Path, Path]:
    """(model folder, LoRA file) for kind "sd1" or "sdxl"."""
    folder = request.getfixturevalue("tiny_sdxl" if kind == "sdxl" else "tiny_sd1")
    return folder, request.getfixturevalue("sdxl_files" if kind == "sdxl" else "files")[form]


def _diffusers_pipe(folder: Path, lora: Path | None = None, fuse: bool = True):
    import diffusers
    from diffusers import LCMScheduler

    sdxl = (folder / "text_encoder_2").is_dir()
    cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
        if fuse:
            pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    return pipe


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("form", ["diffusers", "kohya"])
def test_lcm_lora_merges_as_diffusers_fuses_it(kind, form, request):
    folder, path = _setup(request, kind, form)
    keys = load_state_dict(path)
    if form == "kohya":
        assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in keys)
        assert "lora_unet_mid_block_resnets_0_time_emb_proj.alpha" in keys
    else:
        assert "unet.up_blocks.0.upsamplers.0.conv.lora_A.weight" in keys
    parts, base = load_folder(folder), load_folder(folder)
    report = apply_lora(parts, path)
    n_pairs = sum(".lora_A." in k or ".lora_down." in k for k in keys)
    assert report.warning() is None and len(report.matched) == n_pairs
    assert load_lora(path).format == form
    # every LCM target got a pair: resnet convs, shortcuts, samplers, time_emb_proj, attention
    names = [m.removeprefix("unet.") for m in report.matched]
    for target in LCM_TARGETS:
        assert any(n.endswith("." + target) for n in names), target

    theirs = _diffusers_pipe(folder, path)
    theirs.unload_lora_weights()  # fused: the merged weights stay, peft's wrappers go
    reference = theirs.unet.state_dict()
    mine, before = parts.unet.state_dict(), base.unet.state_dict()
    assert mine.keys() == reference.keys()
    changed = 0
    for key, value in mine.items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)
        changed += not torch.equal(value, before[key])
    assert changed == n_pairs


def _array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _theirs(pipe, scale: float, steps: int = 4) -> np.ndarray:
    out = pipe(
        PROMPT, num_inference_steps=steps, guidance_scale=scale, height=SIZE, width=SIZE,
        generator=torch.Generator("cpu").manual_seed(SEED),
    )  # fmt: skip
    return _array(out.images[0])


@pytest.mark.parametrize(
    "kind, form, fuse",
    [("sd1", "diffusers", False), ("sd1", "kohya", True), ("sdxl", "kohya", False)],
)
def test_lcm_lora_image_matches_diffusers(kind, form, fuse, request):
    """Pipeline.apply_lora + the lcm sampler: diffusers' image (its LoRA unfused or fused)."""
    from ldm.pipeline import load_pipeline

    folder, path = _setup(request, kind, form)
    pipe, plain = (load_pipeline(str(folder), "cpu", "fp32", "off") for _ in range(2))
    report = pipe.apply_lora(path)
    assert report.warning() is None
    kwargs = dict(steps=4, sampler="lcm", guidance_scale=1.0, height=SIZE, width=SIZE)
    (ours,) = pipe([PROMPT], [SEED], **kwargs)
    (without,) = plain([PROMPT], [SEED], **kwargs)
    expected = _theirs(_diffusers_pipe(folder, path, fuse), 1.0)
    assert expected.std() > 5
    diff = np.abs(_array(ours.image) - expected)
    assert diff.max() <= 2, f"{kind} {form}: max pixel diff {diff.max()}/255"
    assert np.abs(_array(without.image) - expected).max() > 10  # the LoRA changed the image


def test_lcm_lora_from_the_cli_matches_diffusers(files, tiny_sd1, tmp_path, capsys):
    """``ldm txt2img --lora FILE --sampler lcm`` with CFG on (scale 2): diffusers' image."""
    from PIL import Image

    from ldm.cli import main

    argv = ["txt2img", "--model", tiny_sd1, "--prompt", PROMPT, "--seed", SEED, "--steps", 4,
            "--sampler", "lcm", "--guidance-scale", 2.0, "--H", SIZE, "--W", SIZE,
            "--lora", files["kohya"], "--outdir", tmp_path, "--no-progress"]  # fmt: skip
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "warning" not in err
    (path,) = out.split()
    expected = _theirs(_diffusers_pipe(tiny_sd1, files["diffusers"], fuse=False), 2.0)
    diff = np.abs(_array(Image.open(path).convert("RGB")) - expected)
    assert diff.max() <= 2, f"max pixel diff {diff.max()}/255"
