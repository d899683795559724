"""fp16 parity with diffusers on a CUDA device: the U-Net, the VAE and the whole pipeline.

The tiny configs and folders of the CPU parity tests (tests/tiny.py), both sides in fp16 on the
GPU. Two fp16 implementations differ by rounding, so each is also compared with diffusers in fp32
on the same device: ldm's fp16 error may be at most twice diffusers' own (plus a floor), i.e.
ldm loses no more precision in fp16 than the reference does. Marked ``gpu`` and skipped without
CUDA; ``LDM_TEST_DEVICE=cpu`` runs them on the CPU to check that they execute (slow fp16 kernels).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from tiny import UNET_SD1, UNET_SD2, VAE

DEVICE = os.environ.get("LDM_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]
HALF = torch.float16
PROMPT, SEED, STEPS, SCALE = "a red circle above a blue square", 1234, 4, 7.5


def _fp16_errors(ours_fn, ref_fn, ref16_fn) -> tuple[float, float, float]:
    """(|ours16 - ref32|, |ref16 - ref32|, scale) as max-abs figures."""
    with torch.no_grad():
        exact = ref_fn().float()
        ours, ref16 = ours_fn().float(), ref16_fn().float()
    scale = exact.abs().max().item()
    assert scale > 0.1  # a real output, not a zero-initialised one
    assert torch.isfinite(ours).all()
    return (ours - exact).abs().max().item(), (ref16 - exact).abs().max().item(), scale


def _assert_as_precise(ours_err: float, ref_err: float, scale: float) -> None:
    """ldm's fp16 error is within 2x diffusers' fp16 error (floor 1e-3 of the output scale)."""
    assert ours_err <= 2 * ref_err + 1e-3 * scale, f"ldm {ours_err:.3g} vs diffusers {ref_err:.3g}"


@pytest.mark.parametrize("cfg", [UNET_SD1, UNET_SD2], ids=["sd1", "sd2"])
def test_unet_fp16_matches_diffusers(cfg: dict) -> None:
    from diffusers import UNet2DConditionModel as DiffusersUNet

    from ldm.models.unet import UNet2DConditionModel, UNetConfig

    torch.manual_seed(0)
    ref = DiffusersUNet(**cfg).eval().to(DEVICE)
    ours = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours = ours.to(DEVICE, HALF)
    ref16 = copy.deepcopy(ref).to(HALF)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen).to(DEVICE)
    context = torch.randn(2, 7, 32, generator=gen).to(DEVICE)
    t = torch.tensor([10.0, 731.5], device=DEVICE)
    errors = _fp16_errors(
        lambda: ours(x.half(), t, context.half()),
        lambda: ref(x, t, context).sample,
        lambda: ref16(x.half(), t, context.half()).sample,
    )
    _assert_as_precise(*errors)


def test_vae_fp16_matches_diffusers() -> None:
    from diffusers import AutoencoderKL as DiffusersVAE

    from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL

    torch.manual_seed(0)
    ref = DiffusersVAE(**VAE).eval().to(DEVICE)
    ours = AutoencoderKL(AutoencoderConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours = ours.to(DEVICE, HALF)
    ref16 = copy.deepcopy(ref).to(HALF)
    gen = torch.Generator().manual_seed(3)
    pixels = (torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1).to(DEVICE)
    z = torch.randn(2, 4, 16, 16, generator=gen).to(DEVICE)
    sf = ours.config.scaling_factor
    errors = _fp16_errors(
        lambda: ours.encode_dist(pixels.half()).mean,
        lambda: ref.encode(pixels).latent_dist.mean,
        lambda: ref16.encode(pixels.half()).latent_dist.mean,
    )
    _assert_as_precise(*errors)
    errors = _fp16_errors(
        lambda: ours.decode(z.half()),
        lambda: ref.decode(z / sf).sample,
        lambda: ref16.decode(z.half() / sf).sample,
    )
    _assert_as_precise(*errors)


def _diffusers_image(folder, dtype: torch.dtype) -> np.ndarray:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=dtype, safety_checker=None
    ).to(DEVICE)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT, num_inference_steps=STEPS, guidance_scale=SCALE, height=32, width=32,
        generator=torch.Generator("cpu").manual_seed(SEED),
    )  # fmt: skip
    return np.asarray(out.images[0], dtype=np.float64)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_pipeline_fp16_matches_diffusers(kind: str, request) -> None:
    from ldm.pipeline import load_pipeline

    folder = request.getfixturevalue(f"tiny_{kind}")
    pipe = load_pipeline(str(folder), device=DEVICE, dtype="fp16")
    (result,) = pipe(
        [PROMPT], [SEED], steps=STEPS, guidance_scale=SCALE, sampler="dpmpp_2m", height=32,
        width=32,
    )  # fmt: skip
    ours = np.asarray(result.image, dtype=np.float64)
    exact, ref16 = _diffusers_image(folder, torch.float32), _diffusers_image(folder, HALF)
    assert exact.std() > 5  # a real image, not a constant one that would trivially agree
    ours_err, ref_err = np.abs(ours - exact).max(), np.abs(ref16 - exact).max()
    assert ours_err <= 2 * ref_err + 2, f"{kind}: ldm {ours_err}/255 vs diffusers {ref_err}/255"
    assert np.abs(ours - ref16).max() <= 8, f"{kind}: ldm vs diffusers fp16 differ by > 8/255"
