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
    # one thread, as this module's Python calls run: the command line otherwise takes the free cores, and a
    # convolution's rounding can depend on how many threads share it
    code = main(["--threads", "1", "generate", "a red sphere", "--base", str(files / "base"), "--steps", "2",
                 "--seed", "3", "--controlnet", f"edges={files / 'cn-edges'}", "--control",
                 f"edges={files / 'edges.png'}", "--scale", "edges=0.8", "--mode", "edges=prompt", "--end", "edges=0.5",
                 "-o", str(out)])
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


def test_preprocess_uses_the_preprocessor_named_in_the_checkpoint(files, tmp_path, monkeypatch):
    from preprocessors.registry import get_preprocessor

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the command's thread count is this test's: the same bits
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


def controls_of(files, name="a"):
    return ["--controlnet", f"{name}={files / 'cn-plain'}", "--control", f"{name}={files / 'edges.png'}"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
        (["--guidance", "-2"], "--guidance must be a finite number >= 0, got -2.0"),
        (["--steps", "0"], "--steps must be an integer in 1..999, got 0"),
        (["--seed", "-1"], "--seed must be an integer in 0..18446744073709551615, got -1; leave it out for a random"),
        (["--seed", str(2**64)], "--seed must be an integer in 0..18446744073709551615"),
        (["--strength", "nan"], r"--strength must be a finite number in (0, 1], got nan"),
        (["--width", "40960", "--height", "40960"],
         "the output size 40960x40960 is over 4.2 MP per image; set a smaller --width and --height"),
        (["--width", "512", "--height", "512", "--num-images", "17"], "--num-images 17 at 512x512 is 4.5 MP"),
        (["--num-images", "2000"], "--num-images 2000 at 64x48 (the control image's size) is 6.1 MP"),
        (["--scale", "a=nan"], r"control a: `scale` must be a finite number in [0, 10], got nan"),
        (["--end", "a=inf"],
         "control a: `start` and `end` must satisfy 0 <= start < end <= 1, got start=0.0, end=inf"),
        (["--device", "nonsense"], "--device 'nonsense': not a device name; use cpu, cuda, cuda:N or mps"),
    ],
)
def test_out_of_range_options_are_one_line_before_anything_loads(files, tmp_path, capsys, extra, message):
    out = tmp_path / "x.png"
    assert message in error_of(capsys, cli(files, *controls_of(files), *extra, "-o", str(out)))
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_that_is_not_here_is_one_line(files, tmp_path, capsys):
    assert "--device 'cuda': no cuda device here" in error_of(
        capsys, cli(files, *controls_of(files), "--device", "cuda", "-o", str(tmp_path / "x.png")))
    assert "--device 'cuda:1'" in error_of(
        capsys, cli(files, *controls_of(files), "--device", "cuda:1", "-o", str(tmp_path / "x.png")))


def test_output_problems_are_found_before_the_work(files, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    message = error_of(capsys, cli(files, *controls_of(files), "-o", str(a_file / "out.png")))
    assert message == f"error: -o {a_file}: is a file, not a folder; choose a folder"
    assert "is a folder" in error_of(capsys, cli(files, *controls_of(files), "-o", str(tmp_path)))
    assert "the output must be a .png path" in error_of(capsys, cli(files, *controls_of(files), "-o", str(a_file)))
    (tmp_path / "batch-1.png").mkdir()  # the second of the numbered outputs cannot be written
    message = error_of(capsys, cli(files, *controls_of(files), "--num-images", "2", "-o", str(tmp_path / "batch.png")))
    assert f"-o {tmp_path / 'batch-1.png'}: is a folder" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch-1.png", "file.txt"]


WRITE_WITH_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from controlkit.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
sys.exit(main(sys.argv[1:]))
"""


def test_a_write_that_fails_after_the_work_is_one_line_and_leaves_nothing(files, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out" / "sphere.png"
    completed = subprocess.run(
        [sys.executable, "-c", WRITE_WITH_A_FILE_SIZE_LIMIT, "generate", "a red sphere", "--base", str(files / "base"),
         "--steps", "1", "--seed", "3", *controls_of(files), "--num-images", "2", "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 1, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in completed.stderr
    assert lines[0].startswith("error: no image written; ") and "sphere-0.png: could not be written" in lines[0]
    assert "(and 1 more)" in lines[0]
    assert list(out.parent.iterdir()) == []  # no 0-byte PNG, no temporary file


def test_a_failed_write_keeps_the_images_already_written_and_says_which(tmp_path):
    from controlkit.errors import OutputError
    from controlkit.pipeline import save_images

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")  # appears after the checks, as a full disk would
    images = [Image.new("RGB", (8, 8), (200, 10, 10))] * 3
    paths = [tmp_path / "out-0.png", blocker / "out-1.png", tmp_path / "out-2.png"]
    with pytest.raises(OutputError) as raised:
        save_images(images, paths, {"seed": 1})
    message = str(raised.value)
    assert message.startswith(f"2 of 3 written ({paths[0]}, {paths[2]}); {paths[1]}: could not be written")
    assert "\n" not in message
    assert json.loads(Image.open(paths[2]).text["controlkit"]) == {"seed": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "out-0.png", "out-2.png"]


def test_defaults_come_from_the_base_and_a_far_size_is_noted(files, tmp_path, capsys):
    out = tmp_path / "plain.png"
    assert cli(files, *controls_of(files), "--width", "32", "--height", "32", "-o", str(out)) == 0
    printed = capsys.readouterr()
    assert "guidance 7.5" in printed.out  # the tiny base records nothing: the usual default
    assert printed.err == "note: the output is 32x32 but the base was made for 64x64 (1/4 of the area); set the " \
        "width and height to 64x64 for its native size\n"
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(photo)
    code = main(["generate", "a red sphere on a grey floor", "--base", "demo", "--controlnet", "edges=demo:canny",
                 "--control", f"edges={photo}", "--preprocess", "--seed", "1", "--steps", "2", "-o",
                 str(tmp_path / "demo.png")])
    printed = capsys.readouterr()
    assert code == 0 and "guidance 2," in printed.out
    assert "note: the output is 128x128 but the base was made for 64x64 (4x the area and about 4x the time)" in \
        printed.err
    assert Image.open(tmp_path / "demo.png").size == (128, 128)
