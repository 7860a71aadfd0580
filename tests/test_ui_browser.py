"""The web page in a real browser: Debian's Chromium driven by Playwright (installed by `make browser`, never
downloaded here) against `controlkit ui` started as a user starts it, on a free port.

A photo is uploaded, its canny map previewed, an image generated and downloaded; the gallery's PNG is decoded and
its settings read back; errors are one line in the page; two sessions at once get the images of one after the
other. Offline: every request the browser makes is recorded, and so is every name the server resolves and every
connection it opens (a sitecustomize on the server's PYTHONPATH wraps socket.getaddrinfo and socket.connect);
all of them must be local.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image
from test_ui import connect, free_port, png_settings, save_foreign_controlnet

ROOT = Path(__file__).resolve().parents[1]
#: Debian's Chromium (`make browser` installs it); another build can be named with CONTROLKIT_CHROMIUM.
CHROMIUM = os.environ.get("CONTROLKIT_CHROMIUM", "/usr/bin/chromium")
STARTUP_SECONDS = 120
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", ""}
#: Records every name the server resolves and every internet socket it connects, one JSON line each.
RECORDER = '''
import json, os, socket

_LOG = os.environ["CONTROLKIT_TEST_CONNECTIONS"]
_resolve, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex


def _record(kind, host):
    with open(_LOG, "a", encoding="utf-8") as log:
        log.write(json.dumps([kind, str(host), os.getpid()]) + "\\n")


def getaddrinfo(host, *args, **kwargs):
    _record("resolve", host)
    return _resolve(host, *args, **kwargs)


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _record("connect", address[0])
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _record("connect", address[0])
    return _connect_ex(self, address)


socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = getaddrinfo, connect, connect_ex
'''
#: Every URL any page of the browser requested, across the tests of this module.
REQUESTS: list[str] = []


@dataclass
class Served:
    url: str
    connections: Path
    folder: Path


def toy_photo(path: Path, index: int = 0) -> tuple[Path, str]:
    """A held-out toy-world render (what the demo models know) as a PNG, with its caption."""
    from controlkit.demo.showcase import held_out_render

    render = held_out_render("canny", index)
    Image.fromarray(render.image).save(path)
    return path, render.caption


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`controlkit ui` over the demo base with two demo ControlNets and one made for another base."""
    folder = tmp_path_factory.mktemp("browser")
    site = folder / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(RECORDER, encoding="utf-8")
    connections = folder / "connections.jsonl"
    foreign = save_foreign_controlnet(folder / "foreign")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "CONTROLKIT_TEST_CONNECTIONS": str(connections)}
    output = folder / "server.log"
    port = free_port()
    with output.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "controlkit", "ui", "--port", str(port), "--concurrency", "2",
             "--controlnet", "canny=demo:canny", "--controlnet", "depth=demo:depth",
             "--controlnet", f"foreign={foreign}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield Served(_wait_for_url(process, output), connections, folder)
    finally:
        process.terminate()  # `controlkit ui` passes it on to the page's process, which removes its files
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode in (0, 143), output.read_text()
    assert "Traceback" not in output.read_text()


def _wait_for_url(process: subprocess.Popen, output: Path) -> str:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        for line in output.read_text().splitlines():
            if line.startswith("controlkit ui: serving "):
                return line.split()[3]
        if process.poll() is not None:
            pytest.fail(f"controlkit ui exited with {process.returncode}:\n{output.read_text()}")
        time.sleep(0.2)
    pytest.fail(f"controlkit ui printed no URL in {STARTUP_SECONDS} s:\n{output.read_text()}")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: `make browser` installs Debian's chromium (or set CONTROLKIT_CHROMIUM)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


@pytest.fixture
def new_page(browser, served):
    """Opens the page in a new browser session (its own cookies and gradio session), recording its requests."""
    contexts = []

    def open_page():
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        context.on("request", lambda request: REQUESTS.append(request.url))
        contexts.append(context)
        page = context.new_page()
        page.goto(served.url)
        page.get_by_label("Prompt", exact=True).wait_for()
        return page

    yield open_page
    for context in contexts:
        context.close()


def fill_generation(page, photo: Path, prompt: str, *, steps: int = 4, seed: int = 7) -> None:
    """Fill the fields and upload `photo` into Control 1, waiting until the upload has turned the unit on."""
    from playwright.sync_api import expect

    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Steps").fill(str(steps))
    page.get_by_label("Seed").fill(str(seed))
    page.locator("input[type=file]").set_input_files(str(photo))
    expect(page.get_by_role("checkbox", name="Enable")).to_be_checked()


def fetch_png(page, image) -> tuple[bytes, Image.Image, dict]:
    """The bytes the page shows in an <img>, decoded, and the settings its PNG carries."""
    import io

    body = page.request.get(image.get_attribute("src")).body()
    decoded, settings = png_settings(io.BytesIO(body))
    return body, decoded, settings


def generate_and_wait(page):
    """Click Generate on a page that has no result yet and wait for its first image."""
    page.get_by_role("button", name="Generate").click()
    result = page.get_by_role("img", name="image 1")
    result.wait_for(timeout=60_000)
    return result


def test_upload_preview_generate_and_download(new_page, tmp_path):
    from playwright.sync_api import expect

    from preprocessors.registry import get_preprocessor

    page = new_page()
    photo, caption = toy_photo(tmp_path / "toy.png")
    fill_generation(page, photo, caption)  # the upload turns its unit on
    expect(page.get_by_label("Preprocessor")).to_have_value("canny")  # what the canny ControlNet names
    page.get_by_role("button", name="Preview").click()
    shown = page.locator("[data-testid=block-label]", has_text="Condition map").locator("xpath=..").locator("img")
    expect(shown).to_be_visible()
    body = page.request.get(shown.get_attribute("src")).body()
    import io

    preview = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    assert np.array_equal(preview, np.asarray(get_preprocessor("canny")(str(photo))))

    result = generate_and_wait(page)
    expect(result).to_be_visible()
    expect(page.get_by_role("img", name="Control 1 map (canny, canny)")).to_be_visible()
    png, image, settings = fetch_png(page, result)
    assert image.size == (64, 64) and np.asarray(image).std() > 0
    assert (settings["prompt"], settings["seed"], settings["steps"], settings["width"]) == (caption, 7, 4, 64)
    assert settings["controls"][0] | {"preprocessor_params": None} == {
        "name": "canny", "controlnet": "demo:canny", "image": "toy.png", "preprocessor": "canny", "scale": 1.0,
        "start": 0.0, "end": 1.0, "mode": "balanced", "resize_mode": "resize", "preprocessor_params": None}
    assert page.get_by_label("Status").input_value().startswith("1 image 64x64, seed 7, 4 steps unipc")
    with page.expect_download() as download:
        page.locator("[data-testid=block-label]", has_text="Downloads").locator("xpath=..").get_by_role(
            "link").first.click()
    assert Path(download.value.path()).read_bytes() == png
    shot = tmp_path / "ui.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] == 1280


def test_the_progress_bar_counts_denoising_steps(new_page, tmp_path):
    page = new_page()
    photo, caption = toy_photo(tmp_path / "toy.png", 1)
    fill_generation(page, photo, caption, steps=80)
    page.get_by_role("button", name="Generate").click()
    seen = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not page.get_by_role("img", name="image 1").count():
        text = page.locator("body").inner_text()
        seen.update(line for line in text.splitlines() if line.startswith("Denoising"))
        time.sleep(0.05)
    assert page.get_by_role("img", name="image 1").count() == 1
    assert len(seen) >= 2, seen  # several steps' progress was shown


def test_errors_are_one_line_in_the_page_and_it_keeps_working(new_page, tmp_path):
    from playwright.sync_api import expect

    page = new_page()
    photo, caption = toy_photo(tmp_path / "toy.png")
    fill_generation(page, photo, caption)
    page.get_by_label("Steps").fill("0")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text("Steps must be an integer in 1..999, got 0")).to_be_visible()
    page.get_by_label("Steps").fill("4")
    broken = tmp_path / "holiday.png"
    broken.write_bytes(b"this is not an image")
    page.locator("[data-testid=block-label]", has_text="Control image").locator("xpath=..").get_by_role(
        "button", name="Remove Image").click()
    page.locator("input[type=file]").set_input_files(str(broken))
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text("Control 1: holiday.png: not a supported image")).to_be_visible()
    page.get_by_label("ControlNet").click()
    page.get_by_role("option", name="foreign").click()
    expect(page.get_by_text("checkpoint is for a different base").first).to_be_visible()
    toasts = page.locator("[data-testid=toast-body]").all_inner_texts()
    assert toasts and not any("Traceback" in text or 'File "' in text for text in toasts)
    # the same page then generates as usual
    page.get_by_label("ControlNet").click()
    page.get_by_role("option", name="canny").click()
    page.locator("[data-testid=block-label]", has_text="Control image").locator("xpath=..").get_by_role(
        "button", name="Remove Image").click()
    page.locator("input[type=file]").set_input_files(str(photo))
    expect(generate_and_wait(page)).to_be_visible()


def test_two_sessions_at_once_get_the_images_of_one_after_the_other(new_page, tmp_path):
    photo, caption = toy_photo(tmp_path / "toy.png", 2)
    pages = [new_page(), new_page()]
    for page in pages:
        fill_generation(page, photo, caption, steps=20, seed=11)
    for page in pages:  # both queued before either finishes
        page.get_by_role("button", name="Generate").click()
    together = []
    for page in pages:
        result = page.get_by_role("img", name="image 1")
        result.wait_for(timeout=60_000)
        _, image, settings = fetch_png(page, result)
        assert settings["controls"][0]["name"] == "canny" and settings["seed"] == 11
        together.append(np.asarray(image.convert("RGB")))
    alone_page = new_page()  # then one more, alone
    fill_generation(alone_page, photo, caption, steps=20, seed=11)
    alone = np.asarray(fetch_png(alone_page, generate_and_wait(alone_page))[1].convert("RGB"))
    assert np.array_equal(together[0], together[1]) and np.array_equal(together[0], alone)


def test_nothing_leaves_the_machine(served, tmp_path):
    """Run last: the browser's requests of every test above, and the server's names and connections."""
    import httpx
    from gradio_client.exceptions import AppError

    remote = {"path": "https://example.com/photo.png", "url": "https://example.com/photo.png",
              "meta": {"_type": "gradio.FileData"}}
    with pytest.raises(AppError):
        connect(served.url, tmp_path).predict(prompt="x", control_1_enable=True, control_1_image=remote,
                                              api_name="/generate")
    for path in ("gradio_api/file=https://example.com/x.png", "gradio_api/proxy=https://example.com/x.png"):
        assert httpx.get(served.url + path, timeout=10).status_code == 403
    assert len(REQUESTS) > 20, "the browser tests ran first and their requests were recorded"
    outside = [url for url in REQUESTS if urlsplit(url).scheme not in ("data", "blob")
               and urlsplit(url).hostname not in LOCAL_HOSTS]
    assert outside == []
    records = [json.loads(line) for line in served.connections.read_text().splitlines()]
    assert any(kind == "connect" for kind, _, _ in records), "the recorder saw the server's own start-up check"
    assert [record for record in records if not _local(record[1])] == []


def _local(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
