"""``ldm serve`` security: binding, credentials, origins, limits, paths, content types.

Each item of the issue's security list is one test, through Starlette's TestClient (the ASGI app
with its lifespan, websocket included) on the demo model.
"""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from ldm.cli import main
from ldm.errors import LdmError
from ldm.serve.app import Server, create_app
from ldm.serve.config import Limits, ServeConfig
from ldm.serve.models import ModelTable

SMALL = {"prompt": "a red circle", "seed": 1, "steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def models():
    table = ModelTable([None])
    table.pipeline(table.selected)
    return table


@pytest.fixture
def make(models, tmp_path):
    def make(**config) -> TestClient:
        server = Server(ServeConfig(outdir=tmp_path / "out", **config), models)
        return TestClient(create_app(server))

    return make


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_loopback_by_default_and_listen_needs_credentials(capsys):
    assert ServeConfig().host == "127.0.0.1" and ServeConfig().port == 7860
    for host in ("0.0.0.0", "192.168.1.5"):
        with pytest.raises(LdmError, match="--api-auth"):
            ServeConfig(host=host).check()
        ServeConfig(host=host, token="t0123456").check()
        with pytest.raises(LdmError, match="--api-token"):
            ServeConfig(host=host, token="a b;c=d").check()
        ServeConfig(host=host, auth=("u", "p")).check()
    assert main(["serve", "--listen"]) == 2  # refused before any model loads
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldm: error:") and "--api-auth" in err and len(err.splitlines()) == 1


def test_credentials_on_every_route_websocket_and_page(make):
    with make(auth=("user", "secret"), token="tok-12345") as client:
        for path in ("/", "/sdapi/v1/samplers", "/queue", "/object_info", "/api/queue",
                     "/history/x", "/view?filename=x", "/v1/models", "/static/app.js"):  # fmt: skip
            r = client.get(path)
            assert r.status_code == 401 and "basic" in r.headers["www-authenticate"].lower()
            assert client.get(path, headers=_basic("user", "wrong")).status_code == 401
        assert client.post("/sdapi/v1/txt2img", json=SMALL).status_code == 401
        ok = client.get("/sdapi/v1/samplers", headers=_basic("user", "secret"))
        assert ok.status_code == 200
        bearer = {"Authorization": "Bearer tok-12345"}
        assert client.post("/sdapi/v1/txt2img", json=SMALL, headers=bearer).status_code == 200
        with pytest.raises(WebSocketDisconnect):
            with client.websocket_connect("/ws") as ws:
                ws.receive_json()
        with client.websocket_connect("/ws?clientId=a&token=tok-12345") as ws:
            assert ws.receive_json()["type"] == "status"
        with client.websocket_connect("/ws", headers=_basic("user", "secret")) as ws:
            assert ws.receive_json()["type"] == "status"


def test_a_token_in_the_page_address_becomes_a_strict_cookie(make):
    with make(token="tok-12345") as client:
        assert client.get("/sdapi/v1/samplers?token=tok-12345").status_code == 401  # page only
        assert client.get("/static/app.js").status_code == 401
        page = client.get("/?token=tok-12345")
        assert page.status_code == 200
        cookie = page.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert client.get("/static/app.js").status_code in (200, 404)  # the cookie now counts
        assert client.get("/sdapi/v1/samplers").status_code == 200
        client.cookies.clear()
        assert client.get("/sdapi/v1/samplers").status_code == 401


def test_foreign_or_null_origin_is_refused_unless_allowed(make):
    with make() as client:
        own = client.post("/sdapi/v1/interrupt", headers={"Origin": "http://testserver"})
        assert own.status_code == 200 and "access-control-allow-origin" not in own.headers
        assert client.post("/sdapi/v1/interrupt").status_code == 200  # no Origin: not a browser
        for origin in ("http://evil.example", "null", "http://testserver.evil.example"):
            r = client.post("/sdapi/v1/txt2img", json=SMALL, headers={"Origin": origin})
            assert r.status_code == 403 and "cors-allow-origins" in r.text
            assert (
                client.post("/prompt", content=b"{}", headers={"Origin": origin}).status_code == 403
            )
            with pytest.raises(WebSocketDisconnect):
                with client.websocket_connect("/ws", headers={"Origin": origin}) as ws:
                    ws.receive_json()
        # reads are not state-changing; and no CORS headers are sent by default
        r = client.get("/sdapi/v1/samplers", headers={"Origin": "http://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    with make(cors_origins=["http://ok.example"]) as client:
        r = client.post("/sdapi/v1/interrupt", headers={"Origin": "http://ok.example"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://ok.example"
        r = client.post("/sdapi/v1/interrupt", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
    with make(cors_origins=["*"]) as client:
        r = client.post("/sdapi/v1/interrupt", headers={"Origin": "http://any.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"]


def _png_b64(w: int, h: int) -> str:
    buffer = io.BytesIO()
    Image.new("L", (w, h)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_limits_name_themselves_and_the_server_answers_after(make):
    limits = Limits(max_pixels=128 * 128, max_steps=10, max_batch=2, max_images=4,
                    max_body=200_000, max_prompt=100)  # fmt: skip
    with make(limits=limits) as client:
        cases = [
            ({"width": 4096, "height": 4096}, "--max-pixels"),
            ({"width": 9000, "height": 8}, "--max-size"),
            ({"steps": 1000}, "--max-steps"),
            ({"batch_size": 3}, "--max-batch"),
            ({"batch_size": 2, "n_iter": 3}, "--max-images"),
            ({"prompt": "x" * 101}, "--max-prompt-chars"),
        ]
        for change, flag in cases:
            r = client.post("/sdapi/v1/txt2img", json={**SMALL, **change})
            assert r.status_code == 422 and flag in r.text, (change, r.text)
        # an init image over the pixel limit is refused from its header, before decoding
        body = {**SMALL, "init_images": [_png_b64(1000, 1000)]}
        r = client.post("/sdapi/v1/img2img", json=body)
        assert r.status_code == 422 and "--max-pixels" in r.text
        r = client.post("/v1/images/generations", json={"prompt": "x", "n": 5, "size": "64x64"})
        assert r.status_code == 400 and "--max-images" in r.json()["error"]["message"]
        huge = b'{"prompt": "' + b"x" * 300_000 + b'"}'
        for path in ("/sdapi/v1/txt2img", "/prompt", "/v1/images/generations"):
            r = client.post(path, content=huge, headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and "--max-body-mb" in r.text
        assert client.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200


def test_no_paths_no_settings_images_typed_and_nosniff(make):
    with make() as client:
        r = client.post("/sdapi/v1/txt2img", json=SMALL)
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"
        for bad in ("../../../etc/passwd", "/etc/passwd", "x.png", "..%2F..%2Fpyproject.toml"):
            r = client.get("/view", params={"filename": bad})
            assert r.status_code == 404 and r.headers["x-content-type-options"] == "nosniff"
        r = client.get("/view", params={"filename": "a.png", "subfolder": "..", "type": "output"})
        assert r.status_code == 404
        for bad in ("../app.py", "..%2Fapp.py", "../../cli/serve.py", "/etc/passwd"):
            assert client.get(f"/static/{bad}").status_code == 404
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "../../etc"})
        assert r.status_code == 422
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "default-src 'self'" in page.headers["content-security-policy"]


def test_view_serves_only_images_this_server_made(make):
    workflow = {"prompt": {"9": {"class_type": "SaveImage"}}}
    with make() as client:
        assert client.post("/prompt", json=workflow).status_code == 400
        body = {"prompt": "x", "size": "64x64", "response_format": "url"}
        r = client.post("/v1/images/generations", json=body)
        url = r.json()["data"][0]["url"]
        image = client.get(url)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert image.headers["x-content-type-options"] == "nosniff"
        assert Image.open(io.BytesIO(image.content)).size == (64, 64)
