"""``ldm serve`` as a process (bad flags, Ctrl-C with a job in flight) and the live preview."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from ldm.cli import main
from ldm.serve.app import Server, create_app
from ldm.serve.config import ServeConfig
from ldm.serve.models import ModelTable
from ldm.serve.runner import free_port
from ldm.serve.worker import Job


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--api-auth", "nocolon"], "user:password"),
        (["--host", "10.0.0.1"], "--api-auth"),
        (["--model", "/no/such/model"], "no such file"),
        (["--queue-size", "0"], "--queue-size"),
        (["--max-steps", "0"], "--max-steps"),
    ],
)
def test_bad_flags_are_one_line_errors(argv, words, capsys):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldm: error:") and words in err and len(err.splitlines()) == 1


def test_ctrl_c_with_a_job_in_flight_stops_cleanly(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "ldm", "serve", "--port", str(port), "--outdir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/sdapi/v1"
    try:
        for _ in range(600):  # the model loads before the port opens
            try:
                if httpx.get(f"{url}/samplers", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        out = {}
        body = {"prompt": "slow", "steps": 150, "n_iter": 8, "width": 64, "height": 64}
        thread = threading.Thread(target=lambda: out.setdefault(
            "r", httpx.post(f"{url}/txt2img", json=body, timeout=120)))  # fmt: skip
        thread.start()
        while httpx.get(f"{url}/progress", timeout=5).json()["state"]["sampling_step"] < 1:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        thread.join(120)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and "Traceback" not in err, err
    info = out["r"].json()["info"]  # the request in flight was answered, interrupted
    assert out["r"].status_code == 200 and '"interrupted": true' in info


class _Previewing:
    """The demo pipeline with the ``preview`` keyword the worker uses where a pipeline has it."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompts, seeds, *, callback=None, preview=None, **settings):
        shape = (len(prompts), self.pipe.vae.latent_channels, 16, 16)

        def on_step(step, num_steps):
            preview(step, num_steps, torch.zeros(shape))
            callback(step, num_steps)

        return self.pipe(prompts, seeds, callback=on_step, **settings)


def test_progress_shows_the_live_preview_where_the_pipeline_offers_it(tmp_path):
    models = ModelTable([None])
    wrapped = _Previewing(models.pipeline(models.selected))
    models.pipeline = lambda name: wrapped
    server = Server(ServeConfig(outdir=tmp_path), models)
    started, release = threading.Event(), threading.Event()

    def hold(kind, data):
        if kind == "progress":
            started.set()
            release.wait(30)

    with TestClient(create_app(server)) as client:
        assert client.get("/sdapi/v1/progress").json()["current_image"] is None
        job = server.worker.submit(Job([(["x"], [1])], dict(steps=2), models.selected,
                                       on_event=hold))  # fmt: skip
        assert started.wait(30)
        progress = client.get("/sdapi/v1/progress").json()
        release.set()
        assert job.future.result(30).images
    image = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert image.size == (64, 64) and progress["state"]["sampling_step"] == 1


def test_switching_among_the_started_models(tmp_path, tiny_sd1):
    models = ModelTable([None, str(tiny_sd1)])
    models.pipeline(models.selected)
    server = Server(ServeConfig(outdir=tmp_path), models)
    small = {"prompt": "x", "seed": 1, "steps": 2, "width": 32, "height": 32}
    with TestClient(create_app(server)) as client:
        titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
        assert len(titles) == 2 and titles[1].startswith(tiny_sd1.name + " [")
        assert (
            client.post("/sdapi/v1/options", json={"sd_model_checkpoint": titles[1]}).json() is None
        )
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles[1]

        def model_of(response) -> str:
            return json.loads(response.json()["info"])["sd_model_name"]

        assert model_of(client.post("/sdapi/v1/txt2img", json=small)) == tiny_sd1.name
        pick = {**small, "override_settings": {"sd_model_checkpoint": "shapes-demo"}}
        assert model_of(client.post("/sdapi/v1/txt2img", json=pick)) == "shapes-demo"
        body = {"prompt": "x", "size": "32x32", "model": tiny_sd1.name, "seed": 3}
        data = client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
        record = json.loads(Image.open(io.BytesIO(base64.b64decode(data))).text["ldm"])
        assert record["model"] == tiny_sd1.name and record["seed"] == 3


def test_every_key_null_is_accepted(tmp_path):
    """webuiapi-style bodies: every key present, many null, unknown ones too."""
    models = ModelTable([None])
    server = Server(ServeConfig(outdir=tmp_path), models)
    from ldm.serve.a1111 import GenerationRequest

    body = {key: None for key in GenerationRequest.model_fields}
    body.update(prompt="a red circle", steps=2, seed=4, hr_upscaler=None, styles=[],
                alwayson_scripts={}, script_args=[], s_churn=0)  # fmt: skip
    with TestClient(create_app(server)) as client:
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["all_seeds"] == [4] and info["width"] == 64  # the model's own size
