"""``ldm serve`` through ComfyUI's protocol (a small client written from it) and the official
``openai`` client, against a uvicorn server in a thread on the demo model."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
import uuid

import pytest
from PIL import Image

from ldm.serve.app import Server
from ldm.serve.config import ServeConfig
from ldm.serve.models import ModelTable
from ldm.serve.runner import ThreadedServer

openai = pytest.importorskip("openai")
ws_client = pytest.importorskip("websockets.sync.client")


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    models = ModelTable([None])
    models.pipeline(models.selected)
    server = Server(ServeConfig(outdir=tmp_path_factory.mktemp("serve"), token="sk-local"), models)
    with ThreadedServer(server) as url:
        yield url


def default_workflow(seed: int = 5, batch: int = 2) -> dict:
    """ComfyUI's default text-to-image graph (API format), at the demo model's size."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 3, "cfg": 7.0, "sampler_name": "dpmpp_2m",
            "scheduler": "karras", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0],
            "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "shapes-demo"}},
        "5": {"class_type": "EmptyLatentImage",
              "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blue", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage",
              "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }  # fmt: skip


AUTH = {"Authorization": "Bearer sk-local"}


def _post(url: str, body: dict, headers: dict | None = None) -> dict:
    # as ComfyUI's script_examples: urllib with a body and no JSON Content-Type
    headers = {**AUTH, **(headers or {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    return json.loads(urllib.request.urlopen(request).read())


def _get(url: str) -> bytes:
    return urllib.request.urlopen(urllib.request.Request(url, headers=AUTH)).read()


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_comfyui_default_workflow_over_the_websocket(url, prefix):
    client_id = uuid.uuid4().hex
    ws_url = url.replace("http", "ws") + f"{prefix}/ws?clientId={client_id}&token=sk-local"
    with ws_client.connect(ws_url) as ws:
        first = json.loads(ws.recv(timeout=30))
        assert first["type"] == "status" and first["data"]["sid"] == client_id
        queued = _post(
            f"{url}{prefix}/prompt", {"prompt": default_workflow(), "client_id": client_id}
        )
        prompt_id = queued["prompt_id"]
        assert queued["node_errors"] == {}
        seen, executed = [], []
        while True:
            message = json.loads(ws.recv(timeout=60))
            data = message["data"]
            seen.append(message["type"])
            if message["type"] == "progress":
                assert data["max"] == 3 and 1 <= data["value"] <= 3
            if message["type"] == "executed":
                executed.append(data)
            if message["type"] == "executing" and data["node"] is None:
                assert data["prompt_id"] == prompt_id
                break
    assert {"execution_start", "executing", "progress", "executed"} <= set(seen)
    assert executed[0]["node"] == "9"
    history = json.loads(_get(f"{url}{prefix}/history/{prompt_id}"))[prompt_id]
    assert history["status"]["completed"] is True
    images = history["outputs"]["9"]["images"]
    assert len(images) == 2 and images == executed[0]["output"]["images"]
    files = [_get(f"{url}{prefix}/view?filename={i['filename']}&type=output") for i in images]
    records = [json.loads(Image.open(io.BytesIO(f)).text["ldm"]) for f in files]
    assert [r["seed"] for r in records] == [5, 6]
    assert (records[0]["sampler"], records[0]["schedule"], records[0]["steps"]) == (
        "dpmpp_2m", "karras", 3)  # fmt: skip
    # the same settings through the A1111 route: the same bytes
    a1111 = {"prompt": "a red circle", "negative_prompt": "blue", "seed": 5, "batch_size": 2,
             "steps": 3, "cfg_scale": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
             "width": 64, "height": 64}  # fmt: skip
    result = _post(f"{url}/sdapi/v1/txt2img", a1111, {"Content-Type": "application/json"})
    assert [base64.b64decode(i) for i in result["images"]] == files


def test_comfyui_other_graphs_are_node_errors(url):
    workflow = default_workflow()
    workflow["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0]}}
    workflow["3"]["inputs"]["scheduler"] = "ddim_uniform"
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(f"{url}/prompt", {"prompt": workflow})
    body = json.loads(e.value.read())
    assert e.value.code == 400 and "LoraLoader" in json.dumps(body["node_errors"]["10"])
    workflow = default_workflow()
    workflow["3"]["inputs"].update(scheduler="ddim_uniform", sampler_name="nope")
    workflow["4"]["inputs"]["ckpt_name"] = "v1-5-pruned-emaonly.safetensors"
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(f"{url}/prompt", {"prompt": workflow})
    errors = json.loads(e.value.read())["node_errors"]
    assert "shapes-demo" in json.dumps(errors["4"]) and "karras" in json.dumps(errors["3"])
    assert "dpmpp_2m" in json.dumps(errors["3"])
    info = json.loads(_get(f"{url}/object_info"))
    assert "dpmpp_2m" in info["KSampler"]["input"]["required"]["sampler_name"][0]
    queue = json.loads(_get(f"{url}/queue"))
    assert set(queue) == {"queue_running", "queue_pending"}


def test_openai_client_generates_and_errors_in_its_shapes(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-local", max_retries=0)
    result = client.images.generate(prompt="a red circle", n=2, size="64x64",
                                    response_format="b64_json", model="shapes-demo")  # fmt: skip
    assert len(result.data) == 2
    pngs = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert all(p.size == (64, 64) and "Steps:" in p.text["parameters"] for p in pngs)
    seeds = [json.loads(p.text["ldm"])["seed"] for p in pngs]
    assert seeds[1] == seeds[0] + 1
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", size="65x64")
    assert "not a multiple of" in e.value.message
    with pytest.raises(openai.BadRequestError, match="--max-images"):
        client.images.generate(prompt="x", n=50, size="64x64")
    with pytest.raises(openai.NotFoundError, match="shapes-demo"):
        client.images.generate(prompt="x", size="64x64", model="dall-e-3")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).images.generate(
            prompt="x", size="64x64")  # fmt: skip
    seeded = [client.images.generate(prompt="x", size="64x64", extra_body={"seed": 7})
              for _ in range(2)]  # fmt: skip
    assert seeded[0].data[0].b64_json == seeded[1].data[0].b64_json


def test_comfyui_interrupt_and_a_refused_websocket(url):
    client_id = uuid.uuid4().hex
    with pytest.raises(Exception) as e:  # the handshake is answered 403: no websocket opens
        ws_client.connect(url.replace("http", "ws") + "/ws?token=wrong").close()
    assert "403" in str(e.value)
    ws_url = url.replace("http", "ws") + f"/ws?clientId={client_id}&token=sk-local"
    workflow = default_workflow(batch=1)
    workflow["3"]["inputs"]["steps"] = 150
    with ws_client.connect(ws_url) as ws:
        prompt_id = _post(f"{url}/prompt", {"prompt": workflow, "client_id": client_id})[
            "prompt_id"
        ]
        seen = []
        while True:
            message = json.loads(ws.recv(timeout=60))
            seen.append(message["type"])
            if message["type"] == "progress" and seen.count("progress") == 1:
                _post(f"{url}/interrupt", {})
            if message["type"] == "executing" and message["data"]["node"] is None:
                break
    assert "execution_interrupted" in seen and "executed" not in seen
    history = json.loads(_get(f"{url}/history/{prompt_id}"))[prompt_id]
    assert history["status"]["completed"] is False and history["outputs"] == {}
