"""The web page through its API (gradio_client against a real server on a free port, in this process): what it
generates equals the command line's images and records their settings, previews and annotation are the
preprocessors' maps, user errors are one line and the server keeps serving, two users at once get the images one
after the other gives, and nothing outside the server's temporary folder (or another machine) is served."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_MODELS = True  # one torch thread in this process (tests/conftest.py); the server runs here too
ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def save_photo(path: Path, name: str = "astronaut", size: tuple[int, int] | None = None) -> Path:
    """A bundled photo (scikit-image's, offline) as a PNG file."""
    from controlkit.demo.photos import sample_photo

    image = Image.fromarray(sample_photo(name))
    (image.resize(size) if size else image).save(path)
    return path


def save_foreign_controlnet(folder: Path) -> Path:
    """A ControlNet made for another base (the tiny test U-Net: cross-attention 32; the demo base's is 64)."""
    from controlkit.checkpoint import save_controlnet
    from controlkit.controlnet import ConditionMetadata, build_controlnet
    from controlkit.tiny import build_components

    unet = build_components(seed=0)["unet"]
    model = build_controlnet(unet, conditioning_embedding_out_channels=(16, 32))
    save_controlnet(model, folder, ConditionMetadata(condition="canny", preprocessor="canny"))
    return folder


def connect(url: str, downloads: Path, **options):
    """A gradio_client Client that keeps what it downloads in `downloads` (its default folder is read from
    GRADIO_TEMP_DIR when gradio_client is first imported: here, possibly a server's temporary folder)."""
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(downloads), **options)


def png_settings(path: str | Path) -> tuple[Image.Image, dict]:
    image = Image.open(path)
    image.load()
    assert image.format == "PNG"
    return image, json.loads(image.info["controlkit"])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server over the demo base with two demo ControlNets and one that does not fit it."""
    from controlkit.ui.server import ServeOptions, start

    folder = tmp_path_factory.mktemp("ui")
    foreign = save_foreign_controlnet(folder / "foreign")
    saved = dict(os.environ)
    options = ServeOptions(port=free_port(), concurrency=2, max_upload_mb=1.0,
                           controlnets={"canny": "demo:canny", "depth": "demo:depth", "foreign": str(foreign)})
    server = start(options)
    try:
        yield server
    finally:
        server.close()
        os.environ.clear()
        os.environ.update(saved)  # start() set this process's gradio environment for its temporary folder


@pytest.fixture(scope="module")
def client(served, tmp_path_factory):
    return connect(served.url, tmp_path_factory.mktemp("downloads"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    return save_photo(tmp_path_factory.mktemp("photos") / "astronaut.png")


def generate(client, photo, **fields):
    from gradio_client import handle_file

    values = {"prompt": "a red sphere on a grey floor", "steps": STEPS, "seed": 5, "control_1_enable": True,
              "control_1_image": handle_file(str(photo)), **fields}
    return client.predict(**values, api_name="/generate")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_gives_the_command_lines_images_with_their_settings(client, photo, tmp_path):
    from controlkit.cli import main

    gallery, downloads, status = generate(client, photo, images=2, width=64, height=48, control_1_weight=0.8)
    images = [item["image"] for item in gallery]
    assert len(images) == 3 and [item["caption"] for item in gallery][-1] == "Control 1 map (canny, canny)"
    assert [Path(path).name for path in downloads] == ["controlkit-5-0.png", "controlkit-5-1.png"]
    for path in images[:2]:
        image, settings = png_settings(path)
        assert image.size == (64, 48)
        assert {key: settings[key] for key in ("prompt", "steps", "seed", "width", "height", "num_images", "base")} \
            == {"prompt": "a red sphere on a grey floor", "steps": STEPS, "seed": 5, "width": 64, "height": 48,
                "num_images": 2, "base": "demo"}
        control = settings["controls"][0]
        assert (control["controlnet"], control["scale"], control["preprocessor"], control["image"]) == \
            ("demo:canny", 0.8, "canny", "astronaut.png")
    assert status.startswith("2 images 64x48, seed 5, 4 steps unipc")
    # the same settings from the command line: the same pixels (the page adds no generation of its own)
    out = tmp_path / "cli.png"
    assert main(["generate", "a red sphere on a grey floor", "--base", "demo", "--controlnet", "canny=demo:canny",
                 "--control", f"canny={photo}", "--preprocess", "--scale", "canny=0.8", "--steps", str(STEPS),
                 "--seed", "5", "--width", "64", "--height", "48", "--num-images", "2", "-o", str(out)]) == 0
    for index, path in enumerate(images[:2]):
        assert np.array_equal(pixels(path), pixels(tmp_path / f"cli-{index}.png"))


def test_preview_shows_the_preprocessors_map(client, photo):
    from gradio_client import handle_file

    from preprocessors.registry import get_preprocessor

    shown = client.predict(control_1_image=handle_file(str(photo)), control_1_preprocessor="canny",
                           control_1_canny_low_threshold=50, api_name="/preview_1")
    expected = np.asarray(get_preprocessor("canny", low_threshold=50)(str(photo)))
    assert np.array_equal(pixels(shown), expected) and expected.max() == 255
    unchanged = client.predict(control_1_image=handle_file(str(photo)), control_1_preprocessor="none",
                               api_name="/preview_1")
    assert np.array_equal(pixels(unchanged), pixels(photo))


@pytest.mark.parametrize("fields, message", [
    ({"steps": 0}, "Steps must be an integer in 1..999, got 0"),
    ({"width": 65}, "Width must be a positive multiple of 8, got 65"),
    ({"width": 4096, "height": 4096}, "the output size 4096x4096 is over 4.2 MP per image"),
    ({"control_1_start": 0.6, "control_1_end": 0.5}, "Control 1: `start` and `end` must satisfy"),
    ({"control_1_weight": 3.0}, "Value 3.0 is greater than maximum value 2.0"),
    ({"control_1_controlnet": "foreign"}, "checkpoint is for a different base"),
    ({"control_1_image": None}, "Control 1: no control image; upload one, or untick Enable"),
    ({"control_1_canny_detect_resolution": "big"}, "parameter `detect_resolution` must be an integer or none"),
])
def test_a_user_error_is_one_line_and_the_server_goes_on(client, photo, fields, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        generate(client, photo, **fields)
    text = str(caught.value)
    assert message in text and "\n" not in text.strip() and "Traceback" not in text
    gallery, _, _ = generate(client, photo)  # the next request is served as usual
    assert png_settings(gallery[0]["image"])[0].size == (64, 64)


def test_a_bad_upload_is_named_as_the_user_called_it(client, photo, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    broken = tmp_path / "holiday.png"
    broken.write_bytes(b"this is not an image")
    with pytest.raises(AppError, match=r"^Control 1: holiday\.png: not a supported image") as caught:
        generate(client, photo, control_1_image=handle_file(str(broken)))
    assert "gradio" not in str(caught.value)  # not the server's upload folder


def test_an_upload_over_the_size_limit_is_refused_by_the_server(served, tmp_path):
    import httpx

    large = tmp_path / "large.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), np.uint8)).save(large)
    assert large.stat().st_size > 2**20  # the served limit is 1 MB
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(small)
    answers = {}
    for path in (large, small):  # straight to the upload route: gradio_client would refuse it before sending
        with path.open("rb") as stream:
            answers[path.name] = httpx.post(f"{served.url}gradio_api/upload", files={"files": stream}, timeout=30)
    assert answers["large.png"].status_code == 413 and not list(served.folder.rglob("large.png"))
    assert answers["small.png"].status_code == 200


def test_an_image_url_is_refused_not_fetched(client, photo):
    from gradio_client.exceptions import AppError

    from controlkit.ui.uploads import UPLOAD_ONLY

    remote = {"path": "https://example.com/photo.png", "url": "https://example.com/photo.png",
              "meta": {"_type": "gradio.FileData"}}
    with pytest.raises(AppError, match=UPLOAD_ONLY):
        generate(client, photo, control_1_image=remote)


def test_annotate_gives_the_maps_as_a_zip_and_names_a_bad_file(client, photo, tmp_path):
    from gradio_client import handle_file

    from preprocessors.registry import get_preprocessor

    second = save_photo(tmp_path / "coffee.png", "coffee")
    broken = tmp_path / "notes.png"
    broken.write_bytes(b"not an image either")
    maps, archive, status = client.predict(
        annotate_preprocessor="canny", annotate_canny_high_threshold=150,
        annotate_images=[handle_file(str(path)) for path in (photo, second, broken)], api_name="/annotate")
    assert status.startswith("2 canny map(s); 1 failed: notes.png: ")
    canny = get_preprocessor("canny", high_threshold=150)
    with zipfile.ZipFile(archive) as bundle:
        assert sorted(bundle.namelist()) == ["astronaut.png", "coffee.png"]
        for name, source in (("astronaut.png", photo), ("coffee.png", second)):
            stored = np.asarray(Image.open(io.BytesIO(bundle.read(name))).convert("RGB"))
            assert np.array_equal(stored, np.asarray(canny(str(source))))
    assert len(maps) == 2


def test_two_users_at_once_get_the_images_of_one_after_the_other(served, photo, tmp_path):
    clients = [connect(served.url, tmp_path / str(index)) for index in range(2)]
    sequential = [pixels(generate(client, photo, steps=20, seed=11)[0][0]["image"]) for client in clients[:1]]
    results: dict[int, np.ndarray] = {}

    def run(index: int) -> None:
        results[index] = pixels(generate(clients[index], photo, steps=20, seed=11)[0][0]["image"])

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == [0, 1]
    assert all(np.array_equal(results[index], sequential[0]) for index in range(2))


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_only_files_of_its_own_temporary_folder_are_served(served, client, photo):
    gallery, _, _ = generate(client, photo)
    made = Path(gallery[0]["image"]).name
    served_files = list(served.folder.rglob(made))
    assert served_files, "the generated PNG lies in the server's temporary folder"
    assert http_status(f"{served.url}gradio_api/file={served_files[0]}") == 200
    for outside in (ROOT / "README.md", Path("/etc/passwd"), served.folder / ".." / ".." / "etc" / "passwd",
                    "https://example.com/x.png", "http://127.0.0.1:1/x.png"):
        assert http_status(f"{served.url}gradio_api/file={outside}") == 403, outside
    assert http_status(f"{served.url}gradio_api/proxy=https://example.com/x.png") == 403


def test_the_page_asks_for_the_password_given(tmp_path):
    from controlkit.ui.server import ServeOptions, start

    saved = dict(os.environ)
    server = start(ServeOptions(port=free_port(), auth=("ada", "lovelace"), controlnets={"canny": "demo:canny"}))
    try:
        assert http_status(f"{server.url}config") == 401
        with pytest.raises(ValueError, match="Could not login"):
            connect(server.url, tmp_path, auth=("ada", "wrong"))
        assert "/generate" in connect(server.url, tmp_path, auth=("ada", "lovelace")).view_api(
            print_info=False, return_format="dict")["named_endpoints"]
    finally:
        server.close()
        os.environ.clear()
        os.environ.update(saved)
    assert not server.folder.exists()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controlkit", "ui", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


@pytest.mark.parametrize("args, message", [
    (["--auth", "nocolon"], "error: --auth expects USER:PASS, both not empty"),
    (["--port", "70000"], "error: --port must be in 1..65535, got 70000"),
    (["--controlnet", "canny=missing/folder"], "error: --controlnet canny missing/folder: no such file or folder"),
    (["--models-dir", "missing"], "error: --models-dir missing: no such folder"),
])
def test_bad_options_are_one_line_before_anything_loads(args, message):
    result = run_cli(*args)
    assert (result.returncode, result.stderr.strip()) == (1, message)


def test_a_busy_port_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--port", str(port))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: cannot serve on 127.0.0.1:{port}: the port is in use or not open to this user; choose another --port")


def test_a_models_folder_serves_its_base_and_controlnets(tmp_path):
    from controlkit.errors import ConfigError
    from controlkit.ui.models import scan_models_dir

    (tmp_path / "sd15").mkdir()
    (tmp_path / "sd15" / "model_index.json").write_text("{}")
    (tmp_path / "canny").mkdir()
    (tmp_path / "canny" / "config.json").write_text("{}")
    (tmp_path / "depth.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a model")
    controlnets = {"canny": str(tmp_path / "canny"), "depth": str(tmp_path / "depth.safetensors")}
    assert scan_models_dir(tmp_path, None) == (str(tmp_path / "sd15"), controlnets)
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds 2 bases"):
        scan_models_dir(tmp_path, None)
    assert scan_models_dir(tmp_path, str(tmp_path / "sdxl"))[0] is None


def test_importing_the_page_package_loads_nothing_heavy():
    code = "import sys, controlkit.ui; print(sorted({m.split('.')[0] for m in sys.modules} & {'gradio', 'torch'}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"
