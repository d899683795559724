"""SD3 generation beyond txt2img: inpainting by latent blending (parity with diffusers'
StableDiffusion3InpaintPipeline), its flow-form identity, ``--from-png`` of inpainted images, and
``ldm batch`` on a flow model (infotext with sampler, schedule and shift; resume)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sd3 import tiny_sd3  # noqa: F401 (fixture)

from ldm.batch.jobs import Invalid, Job, JobSpec, iter_jobs, parse_sweep
from ldm.cli import main
from ldm.infotext import parse_infotext, read_png_metadata
from ldm.modes import blend_known
from ldm.pipeline import load_pipeline
from ldm.sampling.flow import flow_sigmas
from ldm.sampling.samplers import SAMPLERS

KW = dict(prompt="a red circle", negative_prompt="blurry", guidance_scale=5.0, height=64, width=64)


def _init_and_mask():
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[12:44, 20:60] = 255  # not on the 8-pixel latent grid: nearest resizing decides
    mask[44:52, 20:60] = 140  # >= 0.5: repaint (both binarize at 0.5)
    mask[52:60, 20:60] = 100  # < 0.5: keep
    return init, Image.fromarray(mask)


def _diffusers_inpaint(folder, init, mask, strength, steps, seed):
    """diffusers' image, decoded as StableDiffusion3Pipeline decodes: latents / scaling + shift.

    StableDiffusion3InpaintPipeline (diffusers 0.42) decodes ``latents / scaling_factor`` without
    adding the VAE's ``shift_factor`` (its txt2img and img2img pipelines add it), which moves
    every pixel (12-13/255 here). ldm decodes every SD3 image one way, so the comparison takes
    diffusers' latents (``output_type="latent"``) and decodes them with the shift.
    """
    import diffusers

    pipe = diffusers.StableDiffusion3InpaintPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(
        image=init, mask_image=mask, strength=strength, num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed), output_type="latent", **KW,
    ).images  # fmt: skip
    config = pipe.vae.config
    with torch.no_grad():
        pixels = pipe.vae.decode(latents / config.scaling_factor + config.shift_factor).sample
    image = pipe.image_processor.postprocess(pixels, output_type="pil")[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_equals_diffusers(tiny_sd3, strength):  # noqa: F811
    """Same prompt, seed, steps, strength and mask -> within 2/255 per pixel (measured: 0).

    Mask preprocessing matches diffusers' mask processor (grayscale, binarized at 0.5, nearest
    resize to the latent grid); diffusers also encodes the masked image for 33-channel
    transformers, after the noise is drawn, so it does not change a 16-channel model's image.
    """
    init, mask = _init_and_mask()
    settings = {k: v for k, v in KW.items() if k != "prompt"}
    pipe = load_pipeline(tiny_sd3)
    (out,) = pipe([KW["prompt"]], [3], init_image=init, mask=mask, strength=strength, steps=4,
                  **settings)  # fmt: skip
    ours = np.asarray(out.image, dtype=np.int16)
    theirs = _diffusers_inpaint(tiny_sd3, init, mask, strength, 4, seed=3)
    assert np.abs(ours - theirs).max() <= 2, f"max difference {np.abs(ours - theirs).max()}/255"
    assert out.record["mode"] == "inpaint" and out.record["strength"] == strength
    assert out.record["shift"] == 3.0


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_known_region_stays_renoised_to_each_sigma(sampler):
    """Blending the prediction keeps the known latents at (1 - sigma) x0 + sigma eps with the
    first noise eps at every sigma the sampler visits: diffusers' SD3 inpainting re-noising."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    keep = (torch.rand(1, 1, 8, 8, generator=g) > 0.5).float()
    weight = torch.randn(4, 4, generator=g) * 0.3
    seen = []

    def network_denoiser(x, sigma):  # a smooth stand-in network: any prediction will do
        seen.append((x.clone(), sigma.reshape(-1)[0].item()))
        return torch.tanh(torch.einsum("ij,bjhw->bihw", weight, x)) * (
            1 - sigma.reshape(-1, 1, 1, 1)
        )

    sigmas = flow_sigmas("default", 6, {"shift": 3.0})
    x = (1 - sigmas[0]) * x0 + sigmas[0] * eps
    out = SAMPLERS[sampler](blend_known(network_denoiser, x0, keep), x, sigmas)
    assert len(seen) >= 6
    for x_seen, sigma in seen:
        want = (1 - sigma) * x0 + sigma * eps
        assert torch.allclose(x_seen * keep, want * keep, atol=1e-5), sigma
    assert torch.allclose(out * keep, x0 * keep, atol=1e-5)  # sigma 0: the image's own latents


def test_inpaint_cli_from_png_needs_the_mask_and_gives_the_same_image(tiny_sd3, tmp_path, capsys):  # noqa: F811
    init, mask = _init_and_mask()
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    images = ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")]
    args = ["txt2img", "--model", str(tiny_sd3), "--prompt", "a blue square", "--steps", "3",
            "--strength", "0.8", "--shift", "2.5", "--seed", "7", "--no-progress"]  # fmt: skip
    assert main([*args, *images, "--outdir", str(tmp_path / "a")]) == 0
    (png,) = (tmp_path / "a").glob("*.png")
    infotext, record = read_png_metadata(png)
    assert record["mode"] == "inpaint" and record["shift"] == 2.5
    fields = parse_infotext(infotext)
    assert (
        fields["denoising_strength"] == 0.8
        and fields["shift"] == 2.5
        and fields["sampler"] == "euler"
    )

    again = ["txt2img", "--from-png", str(png), "--model", str(tiny_sd3), "--no-progress"]
    assert main([*again, *images[:2], "--outdir", str(tmp_path / "b")]) == 2  # no --mask
    assert "made by inpaint; give its --mask too" in capsys.readouterr().err
    assert main([*again, *images, "--outdir", str(tmp_path / "c")]) == 0
    (png2,) = (tmp_path / "c").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(png2)))


def test_batch_on_sd3_writes_infotext_with_sampler_schedule_shift_and_resumes(
    tiny_sd3,  # noqa: F811
    tmp_path,
    capsys,
):
    init, mask = _init_and_mask()
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    prompts = tmp_path / "p.txt"
    prompts.write_text(
        "a red circle\n"
        '--prompt "a blue square" --seed 5 --cfg_scale 3 --sampler_name "DPM++ 2M" --shift 2\n'
        f'--prompt "a green ball" --seed 9 --init_image {tmp_path / "init.png"} '
        f"--mask {tmp_path / 'mask.png'} --denoising_strength 0.7\n"
    )
    out = tmp_path / "out"
    args = ["batch", "--prompts", str(prompts), "--model", str(tiny_sd3), "--outdir", str(out),
            "--steps", "2", "--H", "64", "--W", "64", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["000000-a-red-circle-0.png", "000001-a-blue-square-5.png",
                     "000002-a-green-ball-9.png"]  # fmt: skip
    texts = {n: read_png_metadata(out / n) for n in names}
    red, blue, green = (texts[n] for n in names)
    assert "Sampler: Euler," in red[0] and "Shift: 3," in red[0] and "Schedule type:" in red[0]
    assert "Sampler: DPM++ 2M," in blue[0] and "Shift: 2," in blue[0]
    assert "Schedule type:" in blue[0]
    assert green[1]["mode"] == "inpaint" and "Denoising strength: 0.7" in green[0]
    assert blue[1]["shift"] == 2.0 and red[1]["shift"] == 3.0  # the checkpoint's
    err = capsys.readouterr().err
    assert "3 made, 0 already done" in err and "0 failed" in err

    # the batch image is the pipeline's for the same settings (the batch encodes each text alone,
    # the pipeline cond and uncond together: last-bit differences); the record shows the shift
    (direct,) = load_pipeline(tiny_sd3)(
        ["a blue square"], [5], steps=2, guidance_scale=3.0, sampler="dpmpp_2m", shift=2.0,
        height=64, width=64,
    )  # fmt: skip
    made = np.asarray(Image.open(out / names[1]), dtype=np.int16)
    assert np.abs(made - np.asarray(direct.image, dtype=np.int16)).max() <= 1

    # resume: nothing is made again; a deleted image is made again with the same bytes
    before = (out / names[2]).read_bytes()
    (out / names[2]).unlink()
    assert main(args) == 0
    assert "1 made, 2 already done" in capsys.readouterr().err
    assert (out / names[2]).read_bytes() == before
    entries = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert {e["params"].get("shift") for e in entries} == {None, 2.0}


def test_batch_shift_is_refused_on_a_model_without_flow(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text('--prompt "a" --shift 2\n--prompt "b" --shift 0\n--prompt "c" --shift 1.5\n')
    unet = list(iter_jobs(prompts, JobSpec(scheduler_config={"_class_name": "DDIMScheduler"})))
    assert all(isinstance(j, Invalid) and "flow models" in j.message for j in unet)
    sd3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    flow = list(iter_jobs(prompts, JobSpec(scheduler_config=sd3)))
    assert isinstance(flow[1], Invalid) and "positive" in flow[1].message
    assert [j.params["shift"] for j in flow if isinstance(j, Job)] == [2.0, 1.5]
    assert parse_sweep("shift=2,3") == ("shift", [2.0, 3.0])  # --sweep shift=...
    by_size = JobSpec(scheduler_config={**sd3, "use_dynamic_shifting": True})  # FLUX.1-dev
    assert all(isinstance(j, Invalid) for j in iter_jobs(prompts, by_size))


def test_outpaint_from_png_makes_the_canvas_again(tiny_sd3, tmp_path):  # noqa: F811
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), np.uint8))
    init.save(tmp_path / "init.png")
    base = ["txt2img", "--model", str(tiny_sd3), "--init-image", str(tmp_path / "init.png"),
            "--no-progress"]  # fmt: skip
    args = ["--prompt", "a wall", "--steps", "2", "--seed", "3", "--outpaint", "8"]
    assert main([*base, *args, "--outdir", str(tmp_path / "a")]) == 0
    (png,) = (tmp_path / "a").glob("*.png")
    assert Image.open(png).size == (64, 64)
    assert read_png_metadata(png)[1]["outpaint"] == "8"
    assert main([*base, "--from-png", str(png), "--outdir", str(tmp_path / "b")]) == 0
    (png2,) = (tmp_path / "b").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(png2)))


def test_batch_no_t5_equals_the_pipeline_without_t5(tiny_sd3, tmp_path):  # noqa: F811
    prompts = tmp_path / "p.txt"
    prompts.write_text("a yellow triangle\n")
    out = tmp_path / "out"
    assert main(["batch", "--prompts", str(prompts), "--model", str(tiny_sd3), "--outdir",
                 str(out), "--steps", "2", "--H", "64", "--W", "64", "--no-t5",
                 "--max-sequence-length", "77", "--no-progress"]) == 0  # fmt: skip
    (png,) = out.glob("*.png")
    made = np.asarray(Image.open(png), dtype=np.int16)
    pipe = load_pipeline(tiny_sd3, t5=False)
    pipe.max_sequence_length = 77  # without T5 still the length of its zeros (diffusers)
    (without,) = pipe(["a yellow triangle"], [0], steps=2, height=64, width=64)
    (with_t5,) = load_pipeline(tiny_sd3)(["a yellow triangle"], [0], steps=2, height=64, width=64)
    assert np.abs(made - np.asarray(without.image, dtype=np.int16)).max() <= 1
    assert np.abs(made - np.asarray(with_t5.image, dtype=np.int16)).max() > 2  # T5 was left out
