"""Issue 19: what A1111, ComfyUI, kohya and diffusers find in ldm's files, one test per item.

A1111's rules are facts of its public format, restated here from its documented behaviour (>= 1.9:
modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py, sd_schedulers.py, sd_samplers.py);
its reader is ``test_infotext.a1111_parse``. The independent routes are k-diffusion (A1111's
sigmas), diffusers (loading our exports) and open_clip (CLIP's reference tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_infotext import a1111_parse

from ldm.cli import batch, main
from ldm.formats.diffusers_folder import save_folder
from ldm.formats.single_file import save_single_file
from ldm.infotext import format_infotext, parse_infotext, read_png_metadata, save_png
from ldm.loading import load_model, model_hash
from ldm.sampling.samplers import SPECS
from ldm.sampling.schedules import NoiseSchedule, get_sigmas

ROOT = Path(__file__).resolve().parents[1]
SD1 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
           set_alpha_to_one=False)  # fmt: skip
# A1111 >= 1.9: the schedule "Automatic" means for each sampler ldm shares with it
A1111_AUTOMATIC = {"DPM++ 2M": "karras", "DPM++ 2M SDE": "exponential",
                   "DPM++ 3M SDE": "exponential", "Euler a": "uniform", "Euler": "uniform",
                   "Heun": "uniform", "LMS": "uniform"}  # fmt: skip


def _run(capsys, *argv) -> tuple[int, list[str], str]:
    rc = main(["txt2img", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


# --- 1. "Schedule type: Automatic" means A1111's per-sampler schedule -------------------------
def test_1_automatic_in_a1111_meaning():
    import k_diffusion

    schedule = NoiseSchedule.from_scheduler_config(SD1)
    model = k_diffusion.external.DiscreteSchedule(schedule.sigmas, quantize=False)
    for n in (7, 20):  # ldm's "uniform" is A1111's Uniform (k-diffusion get_sigmas)
        torch.testing.assert_close(get_sigmas("uniform", n, schedule), model.get_sigmas(n))
    base = dict(prompt="p", steps=20, guidance_scale=7.0, seed=1, width=64, height=64)
    for spec in SPECS:
        text = f"p\nSteps: 20, Sampler: {spec.a1111}, Schedule type: Automatic, Seed: 1"
        if spec.a1111 in A1111_AUTOMATIC:  # read the A1111 way
            assert parse_infotext(text)["schedule"] == A1111_AUTOMATIC[spec.a1111]
            written = format_infotext({**base, "sampler": spec.name,
                                       "schedule": A1111_AUTOMATIC[spec.a1111]})  # fmt: skip
            assert "Schedule type: Automatic" in written
        # ldm's default (diffusers' spacing) is written "Automatic" only where A1111 means it
        got = a1111_parse(format_infotext({**base, "sampler": spec.name, "schedule": "default"}))
        if got["Schedule type"] != "Automatic":
            assert got["Schedule spacing"] == "diffusers"
    # the schedule named beside "Schedule spacing: diffusers" is the nearest A1111 has; "Automatic"
    # (Karras for DPM++ 2M) would be off by a factor ~7 at the last sigma
    kinds = {
        "uniform": lambda n: model.get_sigmas(n),
        "sgm_uniform": lambda n: _a1111_sgm(model, n),
    }
    for sampler, nearest in (("dpmpp_2m", "sgm_uniform"), ("euler_ancestral", "uniform")):
        ours = get_sigmas("default", 20, schedule, sampler)[:-1]
        ref = kinds[nearest](20)[:-1]
        assert float(((ours - ref).abs() / ref).max()) < 0.01
    karras = k_diffusion.sampling.get_sigmas_karras(20, schedule.sigma_min, schedule.sigma_max)
    ours = get_sigmas("default", 20, schedule, "dpmpp_2m")[:-1]
    assert float(((ours - karras[:-1]).abs() / karras[:-1]).max()) > 1


def _a1111_sgm(model, n: int) -> torch.Tensor:
    """A1111's "SGM Uniform": n + 1 points uniform in t from t(sigma_max) to t(sigma_min), last
    dropped, then 0."""
    start, end = model.sigma_to_t(model.sigmas[-1]), model.sigma_to_t(model.sigmas[0])
    sigmas = [model.t_to_sigma(t) for t in torch.linspace(float(start), float(end), n + 1)[:-1]]
    return torch.stack([*sigmas, torch.tensor(0.0)])


# --- 2. DDIM's eta is "Eta DDIM"; "Eta" is the k-diffusion samplers' ----------------------------
def test_2_eta_labels():
    base = "p\nSteps: 4, Sampler: {}, Schedule type: Automatic, Seed: 1, {}: 0.5"
    assert parse_infotext(base.format("DDIM", "Eta DDIM"))["eta"] == 0.5
    ignored = parse_infotext(base.format("DDIM", "Eta"))  # A1111 applies it to Euler a & co
    assert "eta" not in ignored and ignored["extra"] == {"Eta": "0.5"}
    assert parse_infotext(base.format("Euler a", "Eta"))["eta"] == 0.5
    assert "eta" not in parse_infotext(base.format("Euler a", "Eta DDIM"))
    params = dict(prompt="p", steps=4, guidance_scale=7.0, seed=1, width=8, height=8)
    got = a1111_parse(format_infotext({**params, "sampler": "ddim", "eta": 0.5}))
    assert got["Eta DDIM"] == "0.5" and "Eta" not in got
    # A1111 writes an eta only when it is not the sampler's default (DDIM 0, ancestral 1)
    assert "Eta" not in format_infotext({**params, "sampler": "euler_ancestral", "eta": 1.0})
    assert "Eta" not in format_infotext({**params, "sampler": "ddim", "eta": 0.0})


# --- 3. DDPM is not an A1111 sampler: the documented limitation --------------------------------
def test_3_ddpm_documented():
    params = dict(prompt="p", steps=4, guidance_scale=7.0, seed=1, width=8, height=8)
    text = format_infotext({**params, "sampler": "ddpm", "schedule": "default"})
    assert a1111_parse(text)["Sampler"] == "DDPM" and parse_infotext(text)["sampler"] == "ddpm"
    doc = (ROOT / "docs" / "infotext.md").read_text(encoding="utf-8")
    assert "DDPM" in doc and "DPM++ 2M" in doc and "Eta DDIM: 1" in doc


# --- 4 and 9. an fp16 export loads and runs in diffusers with no torch_dtype, quietly ---------
@pytest.fixture(scope="module")
def exported(tiny_sd1, tmp_path_factory) -> Path:
    parts = load_model(tiny_sd1)
    return save_folder(parts, tmp_path_factory.mktemp("export") / "fp16", dtype="fp16")


def test_4_diffusers_runs_an_fp16_export_without_dtype(exported):
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = StableDiffusionPipeline.from_pretrained(exported)
    assert not [w for w in caught if "steps_offset" in str(w.message)]  # item 9
    dtypes = {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype}
    assert dtypes == {torch.float32}
    image = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np")
    assert np.isfinite(image.images).all()


def test_4_diffusers_runs_the_bundled_eps_demo_model():
    from diffusers import StableDiffusionPipeline

    from ldm.models.bundled import resolve_model

    folder = resolve_model("shapes-demo-eps")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np")
    assert np.isfinite(image.images).all()


def test_4_diffusers_classes_sample_the_flow_demo_model_as_ldm_does():
    """The default demo is a flow-matching U-Net in an SD folder, which diffusers' SD pipeline
    cannot drive (its scheduler has no init_noise_sigma): diffusers' own classes load every part,
    and a loop over them (FlowMatchEulerDiscreteScheduler.step, CFG, VAE decode) gives ldm's
    Euler image."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.loading import DEFAULT_MODEL
    from ldm.pipeline import load_pipeline

    prompt, seed, steps, scale = "a red circle left of a blue square", 3, 8, 3.0
    f32 = dict(torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(DEFAULT_MODEL, subfolder="unet", **f32)
    vae = AutoencoderKL.from_pretrained(DEFAULT_MODEL, subfolder="vae", **f32)
    text = CLIPTextModel.from_pretrained(DEFAULT_MODEL, subfolder="text_encoder", **f32)
    tok = CLIPTokenizer.from_pretrained(DEFAULT_MODEL, subfolder="tokenizer")
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(DEFAULT_MODEL, subfolder="scheduler")
    with torch.no_grad():
        ids = tok([prompt, ""], padding="max_length", max_length=77, return_tensors="pt")
        context = text(ids.input_ids)[0]  # (cond, uncond)
        x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            v_cond, v_uncond = unet(torch.cat([x, x]), t, context).sample.chunk(2)
            x = sched.step(v_uncond + scale * (v_cond - v_uncond), t, x).prev_sample
        pixels = vae.decode(x / vae.config.scaling_factor).sample[0]
    theirs = ((pixels.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    (out,) = load_pipeline(DEFAULT_MODEL)([prompt], [seed], steps=steps, sampler="euler",
                                          guidance_scale=scale)  # fmt: skip
    ours = np.asarray(out.image, dtype=np.float64)
    assert ours.std() > 20  # an image, not a flat field
    assert np.abs(ours - theirs).max() <= 2, np.abs(ours - theirs).max()


def test_9_tokenizer_config_and_steps_offset(exported, tiny_sd1, tmp_path):
    config = json.loads((exported / "tokenizer" / "tokenizer_config.json").read_text())
    assert "local_files_only" not in config and config["tokenizer_class"] == "CLIPTokenizer"
    # steps_offset becomes 1 only where no sampler's timesteps add it
    parts = load_model(tiny_sd1)
    for spacing, expected in (("linspace", 1), ("trailing", 1), ("leading", 0), (None, 0)):
        parts.scheduler_config = dict(parts.scheduler_config, steps_offset=0)
        parts.scheduler_config.pop("timestep_spacing", None)
        if spacing:
            parts.scheduler_config["timestep_spacing"] = spacing
        out = save_folder(parts, tmp_path / str(spacing))
        written = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
        assert written["steps_offset"] == expected
        before = NoiseSchedule.from_scheduler_config(parts.scheduler_config)
        after = NoiseSchedule.from_scheduler_config(written)
        for spec in SPECS:
            for n in (7, 20):
                torch.testing.assert_close(
                    get_sigmas("default", n, before, spec.name),
                    get_sigmas("default", n, after, spec.name),
                )


# --- 5. single files: ldm's own export loads; foreign ones take --config -----------------------
def test_5_single_file_config(tiny_sd1, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    own = save_single_file(load_model(tiny_sd1), tmp_path / "own.safetensors")
    foreign = tmp_path / "foreign.safetensors"  # the same weights without ldm's metadata
    save_file(load_file(own), foreign, metadata={"format": "pt"})
    common = ["--prompt", "a red circle", "--steps", 2, "--H", 16, "--W", 16, "--seed", 3,
              "--no-progress"]  # fmt: skip
    images = {}
    for name, extra in (("folder", ["--model", tiny_sd1]), ("own", ["--model", own]),
                        ("given", ["--model", foreign, "--config", tiny_sd1])):  # fmt: skip
        rc, paths, err = _run(capsys, *common, *extra, "--outdir", tmp_path / name)
        assert rc == 0, err
        images[name] = np.asarray(Image.open(paths[0]))
    np.testing.assert_array_equal(images["own"], images["folder"])
    np.testing.assert_array_equal(images["given"], images["folder"])
    rc, _, err = _run(capsys, *common, "--model", foreign, "--outdir", tmp_path / "x")
    assert rc != 0 and "--config" in err and "Traceback" not in err
    rc, _, err = _run(capsys, *common, "--model", foreign, "--config", tmp_path / "nope")
    assert rc != 0 and "nope" in err and "Traceback" not in err
    parser = argparse.ArgumentParser()  # ldm batch takes the same flag
    batch.add_arguments(parser)
    assert parser.parse_args(["--prompts", "p", "--config", "c"]).config == "c"


# --- 6. exported folders get the mode the umask gives a new folder ------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_6_folder_mode_follows_umask(tiny_sd1, tmp_path, umask):
    parts = load_model(tiny_sd1)
    old = os.umask(umask)
    try:
        out = save_folder(parts, tmp_path / "out")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert want == 0o777 & ~umask
    assert stat.S_IMODE(out.stat().st_mode) == want
    assert stat.S_IMODE((out / "unet").stat().st_mode) == want


# --- 7. which LoRA files load where (the LoRA helper's docs) -----------------------------------
def test_7_lora_docs_say_where_each_file_loads():
    doc = (ROOT / "docs" / "lora.md").read_text(encoding="utf-8")
    for tool in ("diffusers", "ComfyUI", "kohya", "A1111"):
        assert tool in doc
    assert "for ComfyUI and A1111 use the kohya file" in doc


# --- 8. CLIP's text cleaning (ftfy + html) ------------------------------------------------------
@pytest.mark.parametrize(
    "text", ["“curly quotes”", "&amp; &lt;tag&gt;", "ﬁne", "Ａｂｃ", "&amp;amp;"]
)
def test_8_tokenizer_cleans_text_as_clip(tiny_sd1, text):
    from open_clip.tokenizer import SimpleTokenizer

    from ldm.formats.diffusers_folder import load_tokenizer
    from ldm.text.tokenizer import build_clip_tokenizer

    want = SimpleTokenizer().encode(text)
    for tokenizer in (build_clip_tokenizer(), load_tokenizer(tiny_sd1 / "tokenizer")):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == want
        assert tokenizer([text])["input_ids"][0][1:-1] == want


# --- Proof: an A1111 PNG -> ldm txt2img --from-png -> the same infotext, field by field ---------
A1111_PNGS = [
    ("DPM++ 2M", "Automatic", {}),
    ("DPM++ 2M SDE", "Automatic", {}),
    ("Euler a", "Automatic", {}),
    ("DDIM", "Automatic", {"Eta DDIM": "0.5"}),
]


@pytest.mark.parametrize("sampler, schedule_type, eta", A1111_PNGS, ids=[s for s, *_ in A1111_PNGS])
def test_a1111_png_round_trip(tiny_sd1, tmp_path, capsys, sampler, schedule_type, eta):
    fields = {"Steps": "3", "Sampler": sampler, "Schedule type": schedule_type,
              "CFG scale": "6.5", "Seed": "1234", "Size": "16x16",
              "Model hash": model_hash(tiny_sd1), "Model": tiny_sd1.name, **eta,
              "Clip skip": "2", "RNG": "CPU", "Version": "v1.10.1"}  # fmt: skip
    line = ", ".join(f"{k}: {v}" for k, v in fields.items())
    text = f"a red circle, (big:1.2)\nNegative prompt: blurry\n{line}"
    png = tmp_path / "a1111.png"
    save_png(Image.new("RGB", (16, 16)), png, text)  # no ldm record: the infotext alone
    rc, paths, err = _run(capsys, "--from-png", png, "--model", tiny_sd1, "--outdir", tmp_path,
                          "--no-progress")  # fmt: skip
    assert rc == 0, err
    infotext, record = read_png_metadata(paths[0])
    ours, theirs = a1111_parse(infotext), a1111_parse(text)
    assert ours.pop("Version").startswith("ldm") and theirs.pop("Version") == "v1.10.1"
    assert ours == theirs
    if eta:
        assert record["eta"] == 0.5
