"""`controlkit convert` and `controlkit info`: outputs, exit codes, one-line errors without tracebacks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from controlkit.checkpoint import save_controlnet
from controlkit.cli import main
from controlkit.controlnet import ConditionMetadata, build_controlnet
from controlkit.tiny import TinyConfig, build_components, save_components

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A diffusers ControlNet folder with metadata, and the tiny base pipeline folder it belongs to."""
    root = tmp_path_factory.mktemp("cli")
    components = build_components(TinyConfig(), seed=0)
    controlnet = build_controlnet(components["unet"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    save_controlnet(controlnet, root / "canny", ConditionMetadata(condition="canny", preprocessor="canny"))
    save_components(components, root / "base")
    return root


def _run(capsys, *argv):
    status = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_info_reports_format_metadata_size_and_base(files, capsys):
    status, out, err = _run(capsys, "info", files / "canny")
    assert status == 0 and err == ""
    assert "format:" in out and "diffusers folder" in out
    assert "condition:           canny" in out
    assert "893,488 in 128 tensors (float32)" in out
    assert "custom U-Nets with cross-attention width 32" in out
    assert ("readable as an original-format file: no: custom layout (cross-attention 32, channels 32/64, 1 layer "
            "per block)") in out
    status, out, _ = _run(capsys, "info", files / "canny", "--json")
    data = json.loads(out)
    assert status == 0 and data["parameter_count"] == 893_488 and data["metadata"]["preprocessor"] == "canny"
    assert data["clients"].startswith("no: custom layout")


def test_convert_to_original_refuses_a_layout_the_clients_cannot_load(files, tmp_path, capsys):
    target = tmp_path / "control_canny.safetensors"
    status, out, err = _run(capsys, "convert", files / "canny", target, "--to", "original")
    assert status == 1 and out == "" and err.count("\n") == 1
    assert "readable by A1111/ComfyUI: no: custom layout" in err and "--force" in err and not target.exists()


def test_convert_to_original_and_back_is_bitwise_and_records_metadata(files, tmp_path, capsys):
    original = tmp_path / "control_canny.safetensors"
    status, out, err = _run(capsys, "convert", files / "canny", original, "--to", "original",
                            "--set", "low_threshold=50", "--base", "SD1.x", "--force")
    assert status == 0 and err == "" and f"wrote {original}" in out
    assert "readable by A1111/ComfyUI: no: custom layout (cross-attention 32, channels 32/64, 1 layer per block)" in out
    with safe_open(str(original), "pt") as reader:
        assert all(key.startswith("control_model.") for key in reader.keys())
        meta = json.loads(reader.metadata()["controlkit"])
    assert meta["condition"] == "canny" and meta["preprocessor_params"] == {"low_threshold": 50}
    assert meta["base"] == "SD1.x"
    status, _, _ = _run(capsys, "convert", original, tmp_path / "back", "--to", "diffusers", "--condition", "edges")
    assert status == 0
    before = load_file(files / "canny" / "diffusion_pytorch_model.safetensors")
    after = load_file(tmp_path / "back" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["_controlkit"]["condition"] == "edges"


def test_convert_half_precision_into_a_folder_destination(files, tmp_path, capsys):
    status, out, _ = _run(capsys, "convert", files / "canny", tmp_path, "--to", "original", "--dtype", "float16",
                          "--force")
    written = tmp_path / "canny.safetensors"
    assert status == 0 and "float16" in out
    assert all(t.dtype == torch.float16 for t in load_file(written).values())


def test_info_with_base_checks_the_fit(files, tmp_path, capsys):
    status, out, _ = _run(capsys, "info", files / "canny", "--base", files / "base")
    assert status == 0 and "fits --base" in out
    config = json.loads((files / "base" / "unet" / "config.json").read_text())
    other = tmp_path / "other_base" / "unet"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 64}))
    status, out, err = _run(capsys, "info", files / "canny", "--base", other.parent)
    assert status == 1 and out == ""
    assert err.startswith("error: ") and "checkpoint is for a different base" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def _bad_inputs(directory):
    (directory / "pointer.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\nsize 12\n")
    (directory / "page.pth").write_bytes(b"<html><body>404</body></html>")
    (directory / "zero.ckpt").write_bytes(b"")
    torch.save({"w": torch.zeros(2)}, directory / "pickle.safetensors")
    return {
        "pointer.safetensors": "Git LFS pointer",
        "page.pth": "HTML page",
        "zero.ckpt": "is empty",
        "pickle.safetensors": "holds a PyTorch pickle",
        "absent.safetensors": "does not exist",
    }


@pytest.mark.parametrize("command", ["info", "convert"])
def test_bad_files_exit_1_with_one_line(tmp_path, capsys, command):
    for name, message in _bad_inputs(tmp_path).items():
        extra = [tmp_path / f"out_{name}", "--to", "diffusers"] if command == "convert" else []
        status, out, err = _run(capsys, command, tmp_path / name, *extra)
        assert status == 1, name
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert "Traceback" not in err and out == ""


def test_convert_refuses_to_overwrite_and_bad_destinations(files, tmp_path, capsys):
    target = tmp_path / "existing.safetensors"
    target.write_bytes(b"keep me")
    status, _, err = _run(capsys, "convert", files / "canny", target, "--to", "original")
    assert status == 1 and "--overwrite" in err and target.read_bytes() == b"keep me"
    status, _, err = _run(capsys, "convert", files / "canny", tmp_path / "model.pth", "--to", "original")
    assert status == 1 and "ending in .safetensors" in err
    status, _, _ = _run(capsys, "convert", files / "canny", target, "--to", "original", "--overwrite", "--force")
    assert status == 0 and len(load_file(target)) == 128


def test_malicious_pickle_is_refused_by_the_command(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(tmp_path / 'ran')!r}, 'w')",)

    torch.save({"state_dict": {}, "x": Payload()}, tmp_path / "evil.ckpt")
    status, _, err = _run(capsys, "info", tmp_path / "evil.ckpt")
    assert status == 1 and "refused" in err and not (tmp_path / "ran").exists()


@pytest.mark.parametrize("command, example", [("convert", "controlkit convert control_v11p_sd15_canny.pth"),
                                              ("info", "controlkit info control_v11p_sd15_canny.pth")])
def test_help_shows_examples(capsys, command, example):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0 and example in capsys.readouterr().out
