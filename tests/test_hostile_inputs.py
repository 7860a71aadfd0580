"""The hostile-input matrix: broken, huge or malicious checkpoints, configs, images, manifests and options, each
given to the command line as a user would. Every case must end with its exit status and ONE line on stderr that
names the problem, never a traceback, never a run of code from the file, never bytes of a file outside the input.

Each row builds its input in a few lines (small files; sizes are declared, not allocated) and runs offline in
well under a second; the whole matrix takes seconds. The areas' own tests go deeper; this is the one table a
reviewer reads to see what is refused and how.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlkit.cli import main

TINY_MODELS = True


class Evil:
    """A pickle payload that would create a file named RAN if it were ever unpickled."""

    def __reduce__(self):
        return (exec, ("open('RAN', 'w').write('ran')",))


@pytest.fixture(scope="module")
def controlnet_folder(tmp_path_factory) -> Path:
    """A real tiny ControlNet folder (diffusers format with condition metadata)."""
    from controlkit.checkpoint import save_controlnet
    from controlkit.controlnet import ConditionMetadata, build_controlnet
    from controlkit.tiny import build_components

    folder = tmp_path_factory.mktemp("cn") / "controlnet"
    unet = build_components(seed=0)["unet"]
    save_controlnet(build_controlnet(unet, conditioning_embedding_out_channels=(16, 32)), folder,
                    ConditionMetadata(condition="canny", preprocessor="canny"))
    return folder


def _config_copy(source: Path, target: Path, **changes) -> Path:
    import shutil

    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def _safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _png(path: Path, size=(64, 48), **save) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 140, 200)).save(path, **save)
    return path


@dataclass
class Case:
    """argv(tmp, controlnet folder) -> the command line; the exit status; a substring of the one error line."""

    name: str
    argv: Callable[[Path, Path], list[str]]
    status: int
    message: str


def _deep_header(tmp: Path) -> Path:
    return _safetensors(tmp / "deep.safetensors", b'{"a":' * 100_000 + b"1" + b"}" * 100_000)


def _bad_offsets(tmp: Path) -> Path:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": "ab"}}).encode()
    return _safetensors(tmp / "offsets.safetensors", header, b"\0" * 4)


def _outside_index(tmp: Path, controlnet: Path) -> Path:
    import shutil

    folder = tmp / "sharded"
    shutil.copytree(controlnet, folder)
    (tmp / "secret.txt").write_text("TOP-SECRET-CONTENT")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"conv_in.weight": "../secret.txt"}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _evil_pickle(tmp: Path) -> Path:
    path = tmp / "evil.pth"
    path.write_bytes(pickle.dumps({"weights": Evil()}, protocol=4))
    return path


def _manifest(tmp: Path, lines: bytes) -> Path:
    _png(tmp / "a.png")
    path = tmp / "pairs.jsonl"
    path.write_bytes(lines)
    return path


BAD_EXIF = b"Exif\0\0XX*\0\x08\0\0\0"  # a TIFF header claiming a byte order that does not exist
TRAIN = ["train", "--check", "training/configs/canny_sd15.toml", "model.base=b", "data.source=d"]

CASES = [
    # -- checkpoints and their configs ------------------------------------------------------------------------
    Case("config asks for 10^6 layers per block", lambda t, c: ["info", str(
        _config_copy(c, t / "layers", layers_per_block=10**6))], 1, "`layers_per_block` is 1000000"),
    Case("config asks for 10^5 channels", lambda t, c: ["info", str(
        _config_copy(c, t / "wide", block_out_channels=[100_000, 100_000]))], 1, "channels per level"),
    Case("config with norm_num_groups 0", lambda t, c: ["info", str(
        _config_copy(c, t / "groups", norm_num_groups=0))], 1, "`norm_num_groups` is 0"),
    Case("header nested 10^5 deep", lambda t, c: ["info", str(_deep_header(t))], 1, "nested more than"),
    Case("offsets of the wrong JSON type", lambda t, c: ["info", str(_bad_offsets(t))], 1, "data_offsets"),
    Case("index pointing outside its folder", lambda t, c: ["info", str(_outside_index(t, c))], 1,
         "not a file next to the index"),
    Case("__reduce__ pickle", lambda t, c: ["info", str(_evil_pickle(t))], 1, "refused as unsafe"),
    Case("custom layout exported for A1111/ComfyUI", lambda t, c: [
        "convert", str(c), str(t / "x.safetensors"), "--to", "original"], 1, "custom layout"),
    # -- training configs ----------------------------------------------------------------------------------------
    Case("learning rate inf", lambda t, c: [*TRAIN, "optim.learning_rate=inf"], 1, "`optim.learning_rate`"),
    Case("seed out of the generator's range", lambda t, c: [*TRAIN, "train.seed=-1"], 1, "`train.seed`"),
    Case("unknown config key", lambda t, c: [*TRAIN, "optim.learning_rat=1e-4"], 1, "optim.learning_rat"),
    # -- images --------------------------------------------------------------------------------------------------
    Case("an 80-byte 512x1 PNG for line-art", lambda t, c: [
        "annotate", str(_png(t / "strip.png", (512, 1))), "-p", "lineart", "-o", str(t / "m"), "--quiet"], 1,
        "more elongated than the limit"),
    Case("a corrupt EXIF block", lambda t, c: [
        "annotate", str(_png(t / "odd.png", exif=BAD_EXIF)), "-p", "canny", "-o", str(t / "m"), "--quiet"], 1,
        "odd.png"),
    Case("a text file named .png", lambda t, c: [
        "annotate", str(_text(t / "notes.png")), "-p", "canny", "-o", str(t / "m"), "--quiet"], 1, "notes.png"),
    Case("an output folder that is a file", lambda t, c: [
        "annotate", str(_png(t / "p.png")), "-p", "canny", "-o", str(_text(t / "afile"))], 1, "is a file"),
    # -- manifests -----------------------------------------------------------------------------------------------
    Case("a manifest line that is not UTF-8", lambda t, c: ["dataset", "check", str(_manifest(
        t, b'{"image": "a.png", "condition": "a.png", "prompt": "caf\xe9"}\n'))], 1, "line 1: not UTF-8"),
    Case("a manifest line that is not JSON", lambda t, c: ["dataset", "check", str(_manifest(
        t, b'{"image": "a.png", "prompt": \n'))], 1, "line 1"),
    # -- options -------------------------------------------------------------------------------------------------
    Case("--set of the wrong type", lambda t, c: [
        "annotate", str(_png(t / "p.png")), "-p", "canny", "--set", "low_threshold=abc", "-o", str(t / "m")], 2,
        "`low_threshold` must be an integer"),
    Case("--set bool that is not one", lambda t, c: [
        "annotate", str(_png(t / "p.png")), "-p", "softedge", "--set", "safe=maybe", "-o", str(t / "m")], 2,
        "`safe` must be true or false"),
    Case("--workers absurd", lambda t, c: [
        "dataset", "check", str(_manifest(t, b"")), "--workers", "100000"], 2, "--workers"),
    Case("--guidance nan", lambda t, c: [
        "generate", "x", "--base", str(t), "--controlnet", f"a={c}", "--control", f"a={_png(t / 'p.png')}",
        "--guidance", "nan", "-o", str(t / "o.png")], 1, "--guidance"),
    Case("--seed negative", lambda t, c: [
        "generate", "x", "--base", str(t), "--controlnet", f"a={c}", "--control", f"a={_png(t / 'p.png')}",
        "--seed", "-1", "-o", str(t / "o.png")], 1, "--seed"),
    Case("-o that is not a PNG", lambda t, c: [
        "generate", "x", "--base", str(t), "--controlnet", f"a={c}", "--control", f"a={_png(t / 'p.png')}",
        "-o", str(t / "o.jpg")], 1, ".png"),
]


def _text(path: Path) -> Path:
    path.write_text("not an image\n")
    return path


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_input_gets_one_line_and_no_traceback(case, controlnet_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # TRAIN's config path is the repository's
    status = main(case.argv(tmp_path, controlnet_folder))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip() and not line.startswith("note:")]
    assert status == case.status, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert len(lines) == 1 and case.message in lines[0], captured.err
    assert "TOP-SECRET" not in captured.err and not Path("RAN").exists()
