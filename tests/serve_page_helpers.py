"""The harness of test_serve_page.py (whose fixtures use it): ``ldm serve`` in a subprocess, a
browser tab on its page that fails the test on script errors or outside requests, and the form
helpers the page tests share.

The server runs as ``python -m ldm serve`` on a free port with the bundled demo model, with
``--api-auth`` and ``--api-token``; the browser is the distribution's Chromium (Playwright's own
browser download is not used).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

try:
    from playwright import sync_api
    from playwright.sync_api import expect
except ImportError:  # the browser tests skip (the browser fixture says why); the others run
    sync_api = expect = None

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
STARTUP_S = 120  # model loading on a busy 2-core machine
UI_TIMEOUT_MS = 60_000  # one tiny job, with other tests running beside it
# The one server runs with --api-auth: every test also shows the page working through the
# browser's basic auth (the browser, not the page, answers the 401 and resends the login).
LOGIN = ("ann", "s3cret")
BASIC = {"Authorization": "Basic " + base64.b64encode(":".join(LOGIN).encode()).decode()}
TOKEN = "t0ken-for-the-page"  # --api-token too: the page opened as /?token=...


def find_chromium() -> str | None:
    """The system Chromium: $LDM_CHROMIUM, else the first of CHROMIUM_NAMES on PATH."""
    named = os.environ.get("LDM_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


class Server:
    """``python -m ldm serve`` in a subprocess; stopped with SIGINT (Ctrl-C), as a user would."""

    def __init__(self, workdir: Path, *extra: str, headers: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = workdir / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "ldm", "serve", "--port", str(self.port), *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=log, env=env)
        self._wait_ready(headers or {})

    def _wait_ready(self, headers: dict) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ldm serve exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                http_json(self.url + "sdapi/v1/samplers", headers)
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        pytest.fail(f"ldm serve did not answer within {STARTUP_S} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Page:
    """One browser tab on the page, failing the test on any script error or outside request."""

    def __init__(self, browser, url: str, query: str = "", **context_args):
        self.context = browser.new_context(**context_args)
        self.context.set_default_timeout(UI_TIMEOUT_MS)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(f"script error: {e}"))
        self.page.on("request", lambda r: self._check_request(r.url, url))
        self.response = self.page.goto(url + query)

    def _check_request(self, requested: str, base: str) -> None:
        if not requested.startswith((base, "data:")):  # the page must work offline
            self.errors.append(f"request outside the server: {requested}")

    def ready(self):
        expect(self.page.locator("body")).to_have_attribute("data-ready", "1")
        return self.page

    def close(self) -> None:
        self.context.close()
        assert not self.errors, self.errors


def choice(items: list[dict], *names: str) -> dict:
    """The sampler/scheduler entry with one of ``names`` as name, label or alias."""
    keys = {n.lower() for n in names}
    for item in items:
        spellings = [item.get("name"), item.get("label"), *(item.get("aliases") or [])]
        if keys & {str(s).lower() for s in spellings if s}:
            return item
    pytest.fail(f"the server lists none of {names}: {[i.get('name') for i in items]}")


def fill(page, **fields) -> None:
    for name, value in fields.items():
        if name in ("sampler_name", "scheduler"):
            page.select_option(f"#{name}", value)
        else:
            page.fill(f"#{name}", str(value))


def png_bytes(infotext: str | None, size=(32, 32)) -> bytes:
    info = PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def shown_png(card) -> tuple[Image.Image, str | None]:
    """The PNG a gallery card displays, decoded from its data: URL, with its embedded infotext."""
    src = card.locator("img").get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    image.load()
    return image, image.info.get("parameters")


def generate(page, expected_cards: int, keys: bool = False):
    if keys:
        page.press("#prompt", "Control+Enter")  # A1111's shortcut
    else:
        page.click("#generate")
    cards = page.locator("#gallery .card")
    expect(cards).to_have_count(expected_cards)
    return cards
