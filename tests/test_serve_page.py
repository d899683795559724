"""The web page of ``ldm serve`` in a real browser: headless Chromium driven by Playwright.

The server (serve_page_helpers.py) runs as ``python -m ldm serve`` with the bundled demo model;
the browser is logged in with HTTP basic auth (the server runs with ``--api-auth``). Without
Playwright or Chromium the tests skip and say what is missing. Tiny jobs (64x64, 3 steps) keep
each test to seconds. What the page shows is checked against independent sources: the infotext
embedded in the PNG the page displays, and infotexts written by ``ldm.infotext`` (not by the
page) for the dropped PNGs.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import pytest
from serve_page_helpers import (
    BASIC,
    CHROMIUM_NAMES,
    LOGIN,
    TOKEN,
    Page,
    Server,
    choice,
    expect,
    fill,
    find_chromium,
    generate,
    http_json,
    png_bytes,
    shown_png,
    sync_api,
)

from ldm.infotext import format_infotext


@pytest.fixture(scope="module")
def browser():
    if sync_api is None:
        pytest.skip("playwright is not installed (pip install playwright; the dev extras have it)")
    chromium = find_chromium()
    if chromium is None:
        where = os.environ.get("LDM_CHROMIUM") or f"{', '.join(CHROMIUM_NAMES)} on PATH"
        pytest.skip(
            f"no system Chromium found ({where}): install the distribution's package "
            "(`apt-get install chromium`) or set LDM_CHROMIUM to its executable"
        )
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI and containers run as root, where Chromium's sandbox cannot start
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, browser):
    pytest.importorskip("fastapi", reason="ldm serve needs fastapi (the dev extras install it)")
    from ldm.loading import DEFAULT_MODEL

    work = tmp_path_factory.mktemp("serve")
    second = work / "shapes-demo-b"  # the page's model selector shows with two models
    second.symlink_to(DEFAULT_MODEL, target_is_directory=True)
    models = ["--model", str(DEFAULT_MODEL), "--model", str(second)]
    login = ["--api-auth", ":".join(LOGIN), "--api-token", TOKEN]
    s = Server(work, *models, *login, headers=BASIC)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def samplers(server) -> list[dict]:
    return http_json(server.url + "sdapi/v1/samplers", BASIC)


@pytest.fixture
def tab(browser, server):
    t = Page(browser, server.url, http_credentials=dict(zip(("username", "password"), LOGIN)))
    yield t
    t.close()


def test_generate_shows_gallery_with_infotext(tab, server, samplers):
    page = tab.ready()
    sampler = choice(samplers, "Euler a", "euler_ancestral")["name"]
    fill(page, prompt="a red circle", negative_prompt="blurry", sampler_name=sampler)
    fill(page, scheduler="karras", steps=3, cfg_scale=5, width=64, height=64)
    fill(page, seed=1234, batch_size=2, n_iter=1)
    cards = generate(page, 2)

    shown = {}
    for i in range(2):
        text = cards.nth(i).locator(".infotext").inner_text()
        image, embedded = shown_png(cards.nth(i))
        assert image.size == (64, 64)
        assert embedded is not None and embedded.strip() == text.strip()  # same record twice
        shown[text] = image
    seeds = sorted(int(t.split("Seed: ")[1].split(",")[0]) for t in shown)
    assert seeds == [1234, 1235]  # A1111's all_seeds: seed + i
    for text in shown:
        assert text.startswith("a red circle\nNegative prompt: blurry\n")
        for part in ("Steps: 3", f"Sampler: {sampler}", "Schedule type: Karras", "CFG scale: 5"):
            assert part in text
        assert "Size: 64x64" in text
    expect(page.locator("#progress-text")).to_have_text("idle")


def test_blank_fields_leave_the_choice_to_the_model(tab):
    page = tab.ready()
    assert page.input_value("#sampler_name") == ""  # "model default"
    assert page.input_value("#scheduler") == "automatic"
    fill(page, prompt="a default square", seed=11)
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        cards = generate(page, 1)
    body = sent.value.post_data_json
    assert not {"sampler_name", "steps", "cfg_scale", "width", "height"} & set(body), body
    assert (body["prompt"], body["seed"], body["scheduler"]) == (
        "a default square",
        11,
        "automatic",
    )
    assert "Seed: 11," in cards.first.locator(".infotext").inner_text()


def test_reuse_settings_from_gallery_image(tab, samplers):
    page = tab.ready()
    sampler = choice(samplers, "DPM++ 2M", "dpmpp_2m")["name"]
    fill(page, prompt="two blue squares,\nside by side", negative_prompt="", steps=2)
    fill(page, sampler_name=sampler, scheduler="exponential", cfg_scale=6.5)
    fill(page, width=64, height=64, seed=31, batch_size=1, n_iter=1)
    cards = generate(page, 1, keys=True)

    default = page.locator("#sampler_name option").first.get_attribute("value")
    fill(page, prompt="other", negative_prompt="x", steps=9, cfg_scale=1, seed=-1)
    fill(page, sampler_name=default, scheduler="karras", width=128, height=96)
    cards.first.locator(".reuse").click()
    expect(page.locator("#prompt")).to_have_value("two blue squares,\nside by side")
    got = {k: page.input_value(f"#{k}") for k in ("steps", "cfg_scale", "seed", "width", "height")}
    assert got == {"steps": "2", "cfg_scale": "6.5", "seed": "31", "width": "64", "height": "64"}
    assert page.input_value("#negative_prompt") == ""
    assert page.input_value("#sampler_name") == sampler
    assert page.input_value("#scheduler") == "exponential"


def drop_file(page, data: bytes, name: str) -> None:
    """A real drop event carrying ``data`` as a File, as dragging it from a file manager does."""
    transfer = page.evaluate_handle(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: "image/png" }));
            return dt;
        }""",
        [base64.b64encode(data).decode(), name],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def test_dropped_png_fills_the_form(tab, samplers):
    page = tab.ready()
    params = dict(prompt="a green triangle, small", negative_prompt="noise:\nmore noise")
    params.update(steps=7, sampler="euler_ancestral", schedule="karras", guidance_scale=3.5)
    params.update(seed=4242, width=96, height=128, model="shapes-demo", clip_skip=2)
    drop_file(page, png_bytes(format_infotext(params)), "dropped.png")  # ldm's own writer

    expect(page.locator("#prompt")).to_have_value(params["prompt"])
    assert page.input_value("#negative_prompt") == params["negative_prompt"]
    got = {k: page.input_value(f"#{k}") for k in ("steps", "cfg_scale", "seed", "width", "height")}
    assert got == {"steps": "7", "cfg_scale": "3.5", "seed": "4242", "width": "96", "height": "128"}
    assert page.input_value("#sampler_name") == choice(samplers, "Euler a")["name"]
    assert page.input_value("#scheduler") == "karras"
    expect(page.locator("#message")).to_contain_text("dropped.png")

    # A1111 < 1.9 folds the schedule into the sampler name; no "Schedule type" key
    old = "a cat\nSteps: 5, Sampler: DPM++ 2M Karras, CFG scale: 6, Seed: 9, Size: 64x96"
    page.set_input_files(
        "#png-file", files=[{"name": "old.png", "mimeType": "image/png", "buffer": png_bytes(old)}]
    )
    expect(page.locator("#prompt")).to_have_value("a cat")
    assert page.input_value("#negative_prompt") == ""
    assert page.input_value("#sampler_name") == choice(samplers, "DPM++ 2M")["name"]
    assert page.input_value("#scheduler") == "karras"
    assert (page.input_value("#width"), page.input_value("#height")) == ("64", "96")

    drop_file(page, png_bytes(None), "plain.png")  # no parameters: the form stays, a message says
    expect(page.locator("#message")).to_contain_text("plain.png carries no generation settings")
    assert page.input_value("#prompt") == "a cat"


def test_progress_bar_eta_and_preview(tab):
    """The page's rendering of /progress, on answers given by the test (a real job is too short
    to be seen at a fixed point), then back on the real server's idle answer."""
    page = tab.ready()
    preview = base64.b64encode(png_bytes(None, (16, 16))).decode()
    running = {
        "progress": 0.5,
        "eta_relative": 3.25,
        "state": {
            "job_count": 2,
            "job_no": 1,
            "sampling_step": 5,
            "sampling_steps": 10,
            "queue_pending": 3,
        },  # fmt: skip
        "current_image": preview,
    }
    page.route("**/sdapi/v1/progress*", lambda route: route.fulfill(json=running))
    expect(page.locator("#progress-text")).to_contain_text("step 5/10")
    assert (
        page.inner_text("#progress-text") == "50% · step 5/10 · batch 2/2 · 3 waiting · ETA 3.3 s"
    )
    assert page.get_attribute("#progress", "aria-valuenow") == "50"
    expect(page.locator("#preview")).to_be_visible()
    assert page.get_attribute("#preview", "src") == f"data:image/png;base64,{preview}"

    page.unroute("**/sdapi/v1/progress*")
    expect(page.locator("#progress-text")).to_have_text("idle")
    expect(page.locator("#preview")).to_be_hidden()


def server_preview(server, tries: int = 20) -> bool:
    """Whether the server's /progress sends a live preview (optional in A1111's API)."""
    for _ in range(tries):
        if http_json(server.url + "sdapi/v1/progress", BASIC).get("current_image"):
            return True
        time.sleep(0.25)
    return False


def test_long_job_shows_progress_queue_and_interrupts(tab, server):
    page = tab.ready()
    # 150 steps (the default --max-steps) at 256x256 in 4 batches: minutes on a CPU, so it is
    # still running when the page is looked at; the test interrupts it
    fill(page, prompt="a slow yellow star", steps=150, width=256, height=256, seed=5)
    fill(page, batch_size=1, n_iter=4)
    page.click("#generate")
    expect(page.locator("#progress-text")).to_contain_text("step ")
    expect(page.locator("#progress-text")).to_contain_text("batch 1/4")
    expect(page.locator("#queue li.running")).to_have_count(1)
    expect(page.locator("#queue li.running")).to_contain_text("a slow yellow star (4 images)")
    page.click("#skip")  # ends the running batch only; the job goes on with the next
    expect(page.locator("#progress-text")).to_contain_text("batch 2/4")
    if server_preview(server):  # what the server sends, the page shows
        expect(page.locator("#preview")).to_be_visible()
        assert page.get_attribute("#preview", "src").startswith("data:image/png;base64,")
    page.click("#interrupt")
    # the server's answer says it was interrupted (info.interrupted); finished batches are kept
    expect(page.locator("#message")).to_contain_text("interrupted after")
    assert page.locator("#gallery .card").count() < 4
    assert "error" not in (page.get_attribute("#message", "class") or "")
    expect(page.locator("#progress-text")).to_have_text("idle")
    expect(page.locator("#queue li")).to_have_text(["empty"])


def test_refusals_are_shown(tab):
    page = tab.ready()
    fill(page, prompt="too many steps", steps=100_000, width=64, height=64)
    page.click("#generate")
    expect(page.locator("#message")).to_contain_text("422")
    expect(page.locator("#message")).to_contain_text("--max-steps")  # the server's own words
    expect(page.locator("#message")).to_have_class("error")
    fill(page, sampler_name="", steps=2, seed=-1)
    page.evaluate("document.getElementById('sampler_name').add(new Option('Nope', 'Nope'))")
    page.select_option("#sampler_name", "Nope")
    page.click("#generate")
    expect(page.locator("#message")).to_contain_text("unknown sampler_name 'Nope'")
    assert page.locator("#gallery .card").count() == 0


def test_model_selector(tab, server):
    page = tab.ready()
    expect(page.locator("#model-row")).to_be_visible()
    titles = [m["title"] for m in http_json(server.url + "sdapi/v1/sd-models", BASIC)]
    assert page.locator("#model option").evaluate_all("os => os.map((o) => o.value)") == titles
    assert page.input_value("#model") == titles[0]
    for title in (titles[1], titles[0]):  # and back, for the other tests
        page.select_option("#model", title)
        expect(page.locator("#message")).to_have_text(f"model: {title}")
        assert http_json(server.url + "sdapi/v1/options", BASIC)["sd_model_checkpoint"] == title


def test_page_needs_the_credentials(browser, server):
    anonymous = browser.new_context()
    try:  # headless Chromium cancels the login dialog: a failed navigation, or the 401 page
        status = anonymous.new_page().goto(server.url).status
    except sync_api.Error as e:
        assert "ERR_INVALID_AUTH_CREDENTIALS" in str(e)
        status = 401
    assert status == 401
    for path in ("static/app.js", "sdapi/v1/samplers", "queue"):
        assert anonymous.request.get(server.url + path).status == 401
    anonymous.close()


def test_page_files_ship_with_the_package():
    """The page is package data: an installed (non-editable) ldm must carry static/."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["ldm"]
    shipped = {p for pattern in patterns for p in (root / "ldm").glob(pattern)}
    static = sorted((root / "ldm" / "serve" / "static").iterdir())
    assert static and not [p.name for p in static if p not in shipped], patterns


def test_page_sends_a_token_as_bearer(browser, server):
    """/#token=T (loaded here through basic auth): the API calls carry "Authorization: Bearer T",
    which the server checks before the browser's basic login."""
    login = dict(zip(("username", "password"), LOGIN))
    t = Page(browser, server.url, query=f"#token={TOKEN}", http_credentials=login)
    page = t.ready()
    assert "token" not in page.url  # kept off the address bar (and out of history)
    fill(page, prompt="a token", steps=2, width=64, height=64, seed=8, batch_size=1, n_iter=1)
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        generate(page, 1)
    assert sent.value.all_headers()["authorization"] == f"Bearer {TOKEN}"
    t.close()


def test_page_with_a_token(browser, server):
    """/?token=T: the page keeps the token for the tab and sends it as a Bearer header."""
    t = Page(browser, server.url, query=f"?token={TOKEN}")
    assert t.response.status == 200
    page = t.ready()
    assert "token" not in page.url  # kept off the address bar (and out of history)
    fill(page, prompt="a token", steps=2, width=64, height=64, seed=8, batch_size=1, n_iter=1)
    generate(page, 1)
    t.close()
