"""A1111 infotext: our writer, our reader, A1111's reader (restated below), PNG chunks."""

import hashlib
import json
import re

import pytest
from PIL import Image

from ldm.errors import LdmError
from ldm.infotext import (
    SAMPLER_TO_A1111,
    SCHEDULE_TO_A1111,
    a1111_sampler_names,
    format_infotext,
    ldm_sampler_names,
    model_hash,
    parse_infotext,
    read_png_metadata,
    save_png,
)

# --- A1111's reader, restated as the reference --------------------------------------------
# From AUTOMATIC1111/stable-diffusion-webui modules/infotext_utils.py (parse_generation_parameters,
# unquote, re_param_code, re_imagesize): the text is stripped and split on "\n"; the last line is
# the parameter line when re_param finds >= 3 pairs in it; every other line is stripped; lines from
# the first one starting with "Negative prompt:" on form the negative prompt (prefix cut, stripped);
# values in double quotes are json.loads-ed; "WxH" values become "<key>-1"/"<key>-2".
A1111_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_parse(x: str) -> dict:
    res, prompt, negative, done_with_prompt = {}, "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(A1111_RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for k, v in A1111_RE_PARAM.findall(lastline):
        if not v:
            continue  # A1111 fails on v[0] here, prints "Error parsing" and skips the key
        if v[0] == '"' and v[-1] == '"':
            try:
                v = json.loads(v)
            except Exception:
                pass
        m = A1111_RE_IMAGESIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


BASE = dict(
    prompt="a photo of a cat",
    negative_prompt="blurry",
    steps=20,
    sampler="dpmpp_2m",
    schedule="karras",
    guidance_scale=7.5,
    seed=42,
    width=512,
    height=512,
    model_hash="0123456789",
    model="demo",
    clip_skip=2,
    rng="CPU",
    version="ldm 0.1.0",
)


def test_golden_line():
    text = format_infotext(BASE)
    assert text == (
        "a photo of a cat\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 7.5, Seed: 42, "
        "Size: 512x512, Model hash: 0123456789, Model: demo, Clip skip: 2, RNG: CPU, "
        "Version: ldm 0.1.0"
    )


TRICKY = [
    dict(prompt="masterpiece, (cat:1.2), [dog], 1girl: solo", negative_prompt="a, b: c"),
    dict(prompt="line one\nline two, with comma\n(line: three)", negative_prompt="x\ny"),
    dict(prompt='she said "hi", \\(escaped\\) \\\\ back', negative_prompt='"quoted"'),
    dict(prompt="猫 café — ünïcödé 🐱, “curly”", negative_prompt="日本語: テスト"),
    dict(prompt="", negative_prompt="only negative"),
    dict(prompt="", negative_prompt=""),
    dict(prompt="no negative", negative_prompt=""),
    dict(prompt="Steps: 1, Sampler: x, Seed: 2", negative_prompt="Steps: 3, Seed: 4, Size: 1x1"),
    dict(
        prompt="p",
        negative_prompt="n",
        model='my, "model": v1.5',
        model_hash="abcdef0123",
        extra={"Denoiser": "karras, v", "Hires upscale": "2", "Note": '"x"', "Empty": ""},
        eta=0.3,
        guidance_rescale=0.7,
        denoising_strength=0.75,
        clip_skip=1,
        schedule="default",
        sampler="euler_ancestral",
        guidance_scale=7.0,
        seed=4294967295,
        width=768,
        height=1024,
        version="ldm 0.1.0, dev",
    ),
]


@pytest.mark.parametrize("case", TRICKY)
def test_round_trip(case):
    params = {**BASE, **case}
    assert parse_infotext(format_infotext(params)) == params


@pytest.mark.parametrize("case", TRICKY)
def test_a1111_reads_our_text(case):
    params = {**BASE, **case}
    got = a1111_parse(format_infotext(params))
    sampler, schedule = a1111_sampler_names(params["sampler"], params["schedule"])
    # A1111 strips whitespace around prompt lines; ours have none at line ends
    assert got["Prompt"] == params["prompt"]
    assert got["Negative prompt"] == params["negative_prompt"]
    assert got["Steps"] == str(params["steps"])
    assert (got["Sampler"], got["Schedule type"]) == (sampler, schedule)
    assert float(got["CFG scale"]) == params["guidance_scale"]
    assert int(got["Seed"]) == params["seed"]
    assert (int(got["Size-1"]), int(got["Size-2"])) == (params["width"], params["height"])
    assert got["Model"] == params["model"] and got["Model hash"] == params["model_hash"]
    assert int(got.get("Clip skip", "1")) == params["clip_skip"]
    assert got["RNG"] == "CPU" and got["Version"] == params["version"]
    for label, value in params.get("extra", {}).items():
        assert got[label] == value


def test_parse_a1111_written_text():
    # the example in parse_generation_parameters' docstring (A1111 < 1.9: no Schedule type)
    text = (
        "girl with an artist's beret, determined, blue eyes, ((eyeshadow)), (coquettish)\n"
        "Negative prompt: ugly, fat, (((deformed))), [blurry], bad anatomy\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, "
        "Model hash: 45dee52b"
    )
    p = parse_infotext(text)
    assert p["prompt"].startswith("girl with") and p["negative_prompt"].endswith("anatomy")
    # what A1111 renders Euler a with: k-diffusion's get_sigmas, ldm's "uniform"
    assert (p["sampler"], p["schedule"]) == ("euler_ancestral", "uniform")
    assert (p["steps"], p["guidance_scale"], p["seed"]) == (20, 7.0, 965400086)
    assert (p["width"], p["height"], p["model_hash"], p["clip_skip"]) == (512, 512, "45dee52b", 1)
    old = parse_infotext("x\nSteps: 5, Sampler: DPM++ 2M SDE Karras, Seed: 1, CFG scale: 5")
    assert (old["sampler"], old["schedule"]) == ("dpmpp_2m_sde", "karras")
    assert parse_infotext("just a prompt, no: params") == {
        "prompt": "just a prompt, no: params",
        "negative_prompt": "",
    }
    with pytest.raises(LdmError, match="Steps"):
        parse_infotext("p\nSteps: many, Sampler: Euler, Seed: 1")


def test_sampler_names_round_trip():
    presets = {"turbo": "euler_ancestral"}  # written as the sampler it presets: same image
    for sampler in SAMPLER_TO_A1111:
        for schedule in SCHEDULE_TO_A1111:
            # ldm's "default" needs the "Schedule spacing" mark where A1111 has no equal
            marked = "diffusers" if schedule == "default" else None
            names = a1111_sampler_names(sampler, schedule)
            want = presets.get(sampler, sampler)
            assert ldm_sampler_names(*names, marked) == (want, schedule)
    assert ldm_sampler_names("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert ldm_sampler_names("DPM++ SDE", "Karras") == ("DPM++ SDE", "karras")  # kept as is
    with pytest.raises(LdmError, match="nope"):
        a1111_sampler_names("nope")


def test_png_round_trip(tmp_path):
    image = Image.new("RGB", (8, 8), (200, 10, 10))
    params = {**BASE, **TRICKY[3]}
    record = {"seed": 42, "dtype": "float32", "prompt": params["prompt"]}
    path = tmp_path / "out" / "img.png"
    save_png(image, path, format_infotext(params), record)
    assert [p.name for p in path.parent.iterdir()] == ["img.png"]  # no temp file left
    text, rec = read_png_metadata(path)
    assert parse_infotext(text) == params and rec == record
    # PIL itself (what A1111 reads through image.info) sees the parameters chunk
    with Image.open(path) as im:
        assert im.info["parameters"] == text and im.getpixel((0, 0)) == (200, 10, 10)

    plain = tmp_path / "plain.png"
    image.save(plain)
    assert read_png_metadata(plain) == (None, None)


def test_png_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for path in (bad, tmp_path / "missing.png"):
        with pytest.raises(LdmError) as e:
            read_png_metadata(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_model_hash(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"weights" * 1000)
    assert model_hash(f) == hashlib.sha256(b"weights" * 1000).hexdigest()[:10]
