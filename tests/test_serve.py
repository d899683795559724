"""``ldm serve``, A1111 side: the real ``webuiapi`` client against a uvicorn server in a thread.

The demo model at its own size (64x64) and 2-4 steps keeps each request well under a second.
Determinism is checked against ``ldm txt2img``'s files; interrupt and skip against the step
callback (they act within one step); the queue, a disconnecting client and an interrupt leave
the server serving.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image

from ldm.cli import main
from ldm.infotext import parse_infotext, read_png_metadata
from ldm.serve.app import Server
from ldm.serve.config import ServeConfig
from ldm.serve.models import ModelTable
from ldm.serve.runner import ThreadedServer
from ldm.serve.worker import Job, QueueFull

webuiapi = pytest.importorskip("webuiapi")
SIZE = dict(width=64, height=64)


@pytest.fixture(scope="module")
def models():
    table = ModelTable([None])
    table.pipeline(table.selected)
    return table


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    server = Server(ServeConfig(outdir=tmp_path_factory.mktemp("serve"), queue_size=2), models)
    with ThreadedServer(server) as url:
        yield server, url


@pytest.fixture
def api(served):
    return webuiapi.WebUIApi(port=int(served[1].rsplit(":", 1)[1]))


def _raw(result, i=0) -> bytes:
    return base64.b64decode(result.json["images"][i])


def _blocking_job(models, started: threading.Event, release: threading.Event) -> Job:
    """A job whose first step waits for ``release`` (holds the worker while a test looks)."""

    def on_event(kind, data):
        if kind == "progress":
            started.set()
            release.wait(30)

    return Job([(["hold"], [1])], dict(steps=2, **SIZE), models.selected, on_event=on_event)


def test_txt2img_batch_seeds_info_and_the_cli_bytes(api, tmp_path, capsys):
    r = api.txt2img(
        prompt="a red circle",
        negative_prompt="blue",
        seed=11,
        batch_size=2,
        steps=3,
        cfg_scale=6.5,
        sampler_name="DPM++ 2M",
        scheduler="karras",
        **SIZE,
    )
    assert len(r.images) == 2 and not r.json["images"][0].startswith("data:")
    info = r.info
    assert info["seed"] == 11 and info["all_seeds"] == [11, 12]
    assert info["sampler_name"] == "DPM++ 2M" and info["sd_model_name"] == "shapes-demo"
    for i in range(2):
        png = Image.open(io.BytesIO(_raw(r, i)))
        assert png.size == (64, 64) and png.text["parameters"] == info["infotexts"][i]
        record = json.loads(png.text["ldm"])
        assert (record["seed"], record["schedule"], record["steps"]) == (11 + i, "karras", 3)
    params = parse_infotext(info["infotexts"][1])
    assert params["seed"] == 12 and params["guidance_scale"] == 6.5

    # the same seed and settings through `ldm txt2img`: the same file bytes
    rc = main(["txt2img", "--prompt", "a red circle", "--negative-prompt", "blue", "--seed", "11",
               "--n-samples", "2", "--steps", "3", "--guidance-scale", "6.5", "--sampler",
               "DPM++ 2M", "--schedule", "karras", "--H", "64", "--W", "64", "--outdir",
               str(tmp_path), "--no-progress"])  # fmt: skip
    paths = capsys.readouterr().out.split()
    assert rc == 0 and len(paths) == 2
    assert [Path(p).read_bytes() for p in paths] == [_raw(r, 0), _raw(r, 1)]


def test_same_request_twice_same_bytes_and_random_seed_reported(api):
    kwargs = dict(prompt="a green square", seed=3, steps=2, sampler_name="Euler a", **SIZE)
    assert _raw(api.txt2img(**kwargs)) == _raw(api.txt2img(**kwargs))
    r = api.txt2img(prompt="a green square", seed=-1, steps=2, **SIZE)
    seed = r.info["seed"]
    assert seed >= 0 and json.loads(r.image.info["ldm"])["seed"] == seed


def test_img2img_and_inpaint_with_data_prefix_or_raw(api):
    base = api.txt2img(prompt="a red circle", seed=1, steps=2, **SIZE).image
    r = api.img2img(images=[base], prompt="a blue circle", seed=2, steps=4,
                    denoising_strength=0.5, **SIZE)  # fmt: skip
    record = json.loads(r.image.info["ldm"])
    assert record["mode"] == "img2img" and record["strength"] == 0.5
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    r = api.img2img(images=[base], mask_image=mask, prompt="a square", seed=2, steps=4,
                    denoising_strength=1.0, **SIZE)  # fmt: skip
    assert json.loads(r.image.info["ldm"])["mode"] == "inpaint"
    # raw base64 (no data: prefix) is accepted too
    raw = base64.b64encode(_png_bytes(base)).decode()
    body = {"prompt": "x", "init_images": [raw], "steps": 2, "seed": 1, **SIZE}
    assert httpx.post(f"{api.baseurl}/img2img", json=body, timeout=60).status_code == 200


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_samplers_schedulers_models_options_png_info(api):
    names = api.util_get_sampler_names()
    assert {"DPM++ 2M", "Euler a", "DDIM", "UniPC"} <= set(names)
    assert {"automatic", "karras", "exponential"} <= set(api.util_get_scheduler_names())
    titles = api.util_get_model_names()
    assert titles and titles[0].startswith("shapes-demo [")
    api.util_set_model("shapes-demo")
    assert api.util_get_current_model() == titles[0]
    bad = httpx.post(f"{api.baseurl}/options", json={"outdir_samples": "/tmp"}, timeout=10)
    assert bad.status_code == 422 and "only sd_model_checkpoint" in bad.text
    bad = httpx.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "nope"}, timeout=10)
    assert bad.status_code == 422 and "shapes-demo" in bad.text
    for sampler, scheduler, word in (("Bogus", "automatic", "DPM++ 2M"),
                                     ("Euler", "polyexponential", "karras")):  # fmt: skip
        with pytest.raises(RuntimeError) as e:
            api.txt2img(prompt="x", sampler_name=sampler, scheduler=scheduler, steps=2, **SIZE)
        assert e.value.args[0] == 422 and word in e.value.args[1]
    image = api.txt2img(prompt="a red circle", seed=9, steps=2, **SIZE).image
    info = api.png_info(image)
    assert info.info == image.info["parameters"] and info.parameters["Seed"] == "9"
    assert api.get_loras() == []


def test_progress_while_a_job_runs_then_interrupt(api, served):
    server = served[0]
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", api.txt2img(
        prompt="a slow circle", seed=1, steps=150, n_iter=4, **SIZE)))  # fmt: skip
    thread.start()
    progress = api.get_progress()
    while progress["state"]["sampling_step"] < 2 and thread.is_alive():
        progress = api.get_progress()
    assert progress["state"]["job_count"] == 4 and 0 < progress["progress"] < 1
    assert progress["eta_relative"] > 0 and progress["state"]["sampling_steps"] == 150
    api.interrupt()
    thread.join(120)
    r = out["r"]
    assert len(r.images) < 4 and r.info["interrupted"] is True
    assert server.worker.running() is None
    assert len(api.txt2img(prompt="next", seed=1, steps=2, **SIZE).images) == 1


def test_interrupt_and_skip_act_within_one_step(served, models):
    """The step callback reads the flags: no step runs after the one that saw them."""
    worker = served[0].worker
    steps_seen = []

    def on_event(kind, data):
        if kind == "progress":
            steps_seen.append((data["batch"], data["value"]))
            if data["value"] == 3 and data["batch"] == 0:
                worker.skip()  # batch 0 stops here; batch 1 runs to the end
            if data["value"] == 4 and data["batch"] == 2:
                worker.interrupt()  # batch 2 stops here; batch 3 never starts

    batches = [(["x"], [i]) for i in range(4)]
    job = worker.submit(Job(batches, dict(steps=6, **SIZE), models.selected, on_event=on_event))
    result = job.future.result(120)
    assert steps_seen == [(0, 1), (0, 2), (0, 3)] + [(1, s) for s in range(1, 7)] + [
        (2, 1), (2, 2), (2, 3), (2, 4)]  # fmt: skip
    assert result.interrupted and [i.record["seed"] for i in result.images] == [1]


def test_full_queue_is_503_and_the_server_keeps_serving(api, served, models):
    worker = served[0].worker  # queue_size=2
    started, release = threading.Event(), threading.Event()
    held = worker.submit(_blocking_job(models, started, release))
    assert started.wait(30)
    waiting = [worker.submit(Job([(["q"], [i])], dict(steps=2, **SIZE), models.selected))
               for i in range(2)]  # fmt: skip
    with pytest.raises(QueueFull):
        worker.submit(Job([(["q"], [9])], dict(steps=2, **SIZE), models.selected))
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="no room", steps=2, **SIZE)
    assert e.value.args[0] == 503 and "queue is full" in e.value.args[1]
    queue = httpx.get(f"{served[1]}/queue", timeout=10).json()
    assert len(queue["queue_running"]) == 1 and len(queue["queue_pending"]) == 2
    release.set()
    for job in [held, *waiting]:
        assert len(job.future.result(60).images) == 1
    assert len(api.txt2img(prompt="room again", steps=2, **SIZE).images) == 1


def test_a_client_that_disconnects_cancels_its_job(api, served):
    body = {"prompt": "gone", "seed": 1, "steps": 150, "n_iter": 16, **SIZE}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{api.baseurl}/txt2img", json=body, timeout=1.0)
    # the cancelled job stops within a step; the next request is served
    r = api.txt2img(prompt="still here", seed=1, steps=2, **SIZE)
    assert len(r.images) == 1
    made = [p for p in Path(served[0].outputs.outdir).iterdir() if "gone" in p.name]
    assert len(made) < 16


def test_infotext_record_in_saved_file_equals_response(api, served):
    r = api.txt2img(prompt="on disk", seed=4, steps=2, **SIZE)
    name = next(p for p in served[0].outputs.outdir.iterdir() if "on-disk" in p.name)
    assert name.read_bytes() == _raw(r)
    infotext, record = read_png_metadata(name)
    assert infotext == r.info["infotexts"][0] and record["prompt"] == "on disk"
