"""`controlkit eval` end to end on tiny real SD components: report, JSON, grids, skipped pairs, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from controlkit.cli import main

ARGS = ["--steps", "2", "--resolution", "32", "--seed", "1"]  # tiny and fast: 4 generations in all


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base (diffusers folder) and a canny ControlNet with non-zero zero-convolutions, as after training."""
    from controlkit.checkpoint import save_controlnet
    from controlkit.controlnet import ConditionMetadata, build_controlnet
    from controlkit.tiny import build_components, save_components

    root = tmp_path_factory.mktemp("models")
    components = build_components(seed=0)
    save_components(components, root / "base")
    torch.manual_seed(1)
    controlnet = build_controlnet(components["unet"], conditioning_embedding_out_channels=(16, 32))
    for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
        torch.nn.init.normal_(conv.weight, std=0.3)
    metadata = ConditionMetadata(condition="canny", preprocessor="canny", preprocessor_params={"low_threshold": 50})
    save_controlnet(controlnet, root / "canny", metadata)
    return root


@pytest.fixture()
def data(tmp_path):
    """Two photos with captions (maps computed by canny) and one missing image."""
    photos = [skimage.data.astronaut(), skimage.data.coffee()]
    lines = []
    for index, photo in enumerate(photos):
        Image.fromarray(np.ascontiguousarray(photo[::8, ::8])).save(tmp_path / f"{index}.png")
        lines.append({"image": f"{index}.png", "prompt": "a red sphere"})
    lines.append({"image": "gone.png", "prompt": "a blue cube"})
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return tmp_path / "val.jsonl"


def run_eval(models, data, *extra):
    return main(["eval", "--base", str(models / "base"), "--controlnet", f"canny={models / 'canny'}",
                 "--data", str(data), *ARGS, *extra])


def test_eval_reports_edge_f1_as_json_and_skips_bad_pairs(models, data, tmp_path, capsys):
    assert run_eval(models, data, "--json", "--output", str(tmp_path / "grids")) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert (report["condition"], report["metric"], report["higher_is_better"]) == ("canny", "edge_f1", True)
    assert (report["pairs"], report["skipped"]) == (2, 1)
    values = [entry["value"] for entry in report["per_image"]]
    assert [entry["key"] for entry in report["per_image"]] == ["0.png", "1.png"]
    assert all(0.0 <= value <= 1.0 for value in values)
    assert report["value"] == pytest.approx(np.mean(values))
    assert "skipped gone.png: image:" in captured.err and "no such file" in captured.err
    grids = sorted((tmp_path / "grids").glob("*.png"))
    assert len(grids) == 2 and Image.open(grids[0]).size == (64, 32)  # condition | generated
    # The left half of a grid is the canny map the image was generated from (thresholds stored with the model).
    left = np.asarray(Image.open(grids[0]))[:, :32]
    assert set(np.unique(left)) <= {0, 255} and left.any()


def test_eval_is_deterministic_and_prints_one_line(models, data, capsys):
    assert run_eval(models, data, "--limit", "1") == 0
    first = capsys.readouterr().out
    assert run_eval(models, data, "--limit", "1") == 0
    assert capsys.readouterr().out == first
    assert first.startswith("canny: edge_f1 ") and "(higher is better) over 1 pairs" in first


def test_eval_errors_are_one_line_with_exit_status_1(models, data, tmp_path, capsys):
    assert main(["eval", "--base", str(models / "base"), "--controlnet", f"segment={models / 'canny'}",
                 "--data", str(data), *ARGS]) == 1
    assert "no controllability metric for condition 'segment'" in capsys.readouterr().err
    assert main(["eval", "--base", str(tmp_path / "nothing"), "--controlnet", f"canny={models / 'canny'}",
                 "--data", str(data), *ARGS]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "gone.png", "prompt": "p"}) + "\n")
    assert run_eval(models, tmp_path / "bad.jsonl") == 1
    assert "no pair of" in capsys.readouterr().err
    assert main(["eval", "--base", "b", "--controlnet", "canny", "--data", str(data)]) == 2
