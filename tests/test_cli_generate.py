"""`controlkit generate` end to end on a tiny base and ControlNets saved to disk: outputs, the same pixels as the
Python API, preprocessing named by checkpoint metadata, and one-line errors with exit status 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from controlkit.checkpoint import save_controlnet
from controlkit.cli import main
from controlkit.control import Control
from controlkit.controlnet import ConditionMetadata, build_controlnet
from controlkit.pipeline import generate, load_base
from controlkit.tiny import TinyConfig, build_components, save_components

TINY_MODELS = True  # one torch thread for this module (tests/conftest.py)



def trained_like(unet, seed=1):
    torch.manual_seed(seed)
    controlnet = build_controlnet(unet, conditioning_embedding_out_channels=(16, 32))
    embedding = controlnet.controlnet_cond_embedding
    for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, embedding.conv_out):
        torch.nn.init.normal_(conv.weight, std=0.3)
    return controlnet.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny base folder, two ControlNet folders (one naming canny as its preprocessor), images."""
    root = tmp_path_factory.mktemp("generate")
    components = build_components(seed=0)
    save_components(components, root / "base")
    save_controlnet(trained_like(components["unet"]), root / "cn-edges",
                    ConditionMetadata(condition="canny", preprocessor="canny"))
    save_controlnet(trained_like(components["unet"], seed=2), root / "cn-plain", ConditionMetadata())
    edges = np.zeros((48, 64, 3), np.uint8)
    edges[12:36, 20] = 255
    edges[24, 8:56] = 255
    Image.fromarray(edges).save(root / "edges.png")
    photo = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    photo[:, 32:] //= 4
    Image.fromarray(photo).save(root / "photo.png")
    return root


def cli(files, *extra):
    return main(["generate", "a red sphere", "--base", str(files / "base"), "--steps", "2", "--seed", "3", *extra])


def test_writes_the_same_image_as_the_python_api(files, tmp_path, capsys):
    out = tmp_path / "out" / "sphere.png"
    code = cli(files, "--controlnet", f"edges={files / 'cn-edges'}", "--control", f"edges={files / 'edges.png'}",
               "--scale", "edges=0.8", "--mode", "edges=prompt", "--end", "edges=0.5", "-o", str(out))
    assert code == 0
    written = Image.open(out)
    assert written.size == (64, 48)  # the control image's size
    record = json.loads(written.text["controlkit"])
    assert record["seed"] == 3 and record["controls"][0]["mode"] == "prompt" and record["controls"][0]["end"] == 0.5
    assert "seed 3" in capsys.readouterr().out

    base = load_base(files / "base")
    control = Control.from_pretrained(files / "cn-edges", files / "edges.png", scale=0.8, mode="prompt", end=0.5)
    expected = generate(base, "a red sphere", [control], steps=2, seed=3).images[0]
    np.testing.assert_array_equal(np.asarray(written.convert("RGB")), np.asarray(expected))


def test_several_images_are_numbered(files, tmp_path):
    out = tmp_path / "batch.png"
    code = cli(files, "--controlnet", f"a={files / 'cn-plain'}", "--control", f"a={files / 'edges.png'}",
               "--num-images", "2", "--width", "32", "--height", "32", "-o", str(out))
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch-0.png", "batch-1.png"]
    assert Image.open(tmp_path / "batch-1.png").size == (32, 32)


def test_two_controls_and_img2img(files, tmp_path):
    out = tmp_path / "two.png"
    code = cli(files, "--controlnet", f"a={files / 'cn-plain'}", "--control", f"a={files / 'edges.png'}",
               "--controlnet", f"b={files / 'cn-edges'}", "--control", f"b={files / 'edges.png'}",
               "--mode", "b=control", "--init-image", str(files / "photo.png"), "--strength", "1.0", "-o", str(out))
    assert code == 0
    assert [c["name"] for c in json.loads(Image.open(out).text["controlkit"])["controls"]] == ["a", "b"]


def test_preprocess_uses_the_preprocessor_named_in_the_checkpoint(files, tmp_path):
    from preprocessors.registry import get_preprocessor

    out = tmp_path / "pre.png"
    code = cli(files, "--controlnet", f"edges={files / 'cn-edges'}", "--control", f"edges={files / 'photo.png'}",
               "--preprocess", "-o", str(out))
    assert code == 0
    base = load_base(files / "base")
    control = Control.from_pretrained(files / "cn-edges", files / "photo.png", preprocessor=get_preprocessor("canny"))
    expected = generate(base, "a red sphere", [control], steps=2, seed=3).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))


def test_preprocess_without_metadata_uses_the_control_name(files, tmp_path, capsys):
    assert cli(files, "--controlnet", f"canny={files / 'cn-plain'}", "--control", f"canny={files / 'photo.png'}",
               "--preprocess", "-o", str(tmp_path / "a.png")) == 0
    code = cli(files, "--controlnet", f"blobs={files / 'cn-plain'}", "--control", f"blobs={files / 'photo.png'}",
               "--preprocess", "-o", str(tmp_path / "b.png"))
    assert code == 1
    assert "Unknown preprocessor 'blobs'" in capsys.readouterr().err


def error_of(capsys, code):
    captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_missing_controlnet_weights(files, tmp_path, capsys):
    code = cli(files, "--controlnet", f"a={tmp_path / 'nowhere'}", "--control", f"a={files / 'edges.png'}",
               "-o", str(tmp_path / "x.png"))
    assert "nowhere" in error_of(capsys, code)


def test_missing_base(files, tmp_path, capsys):
    code = main(["generate", "x", "--base", str(tmp_path / "no-base"), "-o", str(tmp_path / "x.png")])
    assert "no such file or folder" in error_of(capsys, code)


def test_controlnet_for_another_base(files, tmp_path, capsys):
    other = build_components(TinyConfig(block_out_channels=(16, 32), vae_channels=(16, 32)))["unet"]
    save_controlnet(build_controlnet(other, conditioning_embedding_out_channels=(16, 32)), tmp_path / "cn-other",
                    ConditionMetadata())
    code = cli(files, "--controlnet", f"a={tmp_path / 'cn-other'}", "--control", f"a={files / 'edges.png'}",
               "-o", str(tmp_path / "x.png"))
    assert "different base" in error_of(capsys, code)


def test_bad_control_image(files, tmp_path, capsys):
    fake = tmp_path / "edges.png"
    fake.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n")
    code = cli(files, "--controlnet", f"a={files / 'cn-plain'}", "--control", f"a={fake}",
               "-o", str(tmp_path / "x.png"))
    assert "Git LFS pointer" in error_of(capsys, code)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--control", "a=edges.png"], "--control a has no ControlNet; add --controlnet a=PATH"),
        (["--controlnet", "a=cn-plain"], "--controlnet a has no condition image; add --control a=IMAGE"),
        (["--controlnet", "a=cn-plain", "--control", "a=edges.png", "--scale", "b=0.5"], "no control named 'b'"),
        (["--controlnet", "a=cn-plain", "--control", "a=edges.png", "--mode", "a=guess"], "`mode` must be one of"),
        (["--controlnet", "a=cn-plain", "--control", "a=edges.png", "--width", "100"], "multiple of 8"),
    ],
)
def test_inconsistent_options(files, tmp_path, capsys, extra, message):
    extra = [item.replace("edges.png", str(files / "edges.png")).replace("cn-plain", str(files / "cn-plain"))
             for item in extra]
    assert message in error_of(capsys, cli(files, *extra, "-o", str(tmp_path / "x.png")))
