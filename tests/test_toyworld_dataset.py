"""The toy world's dataset writer: what it writes reads back as training pairs, reruns resume, bad settings fail."""

from __future__ import annotations

import json

import numpy as np
import pytest

from controlkit.demo.toyworld.world import (
    render_circles,
    render_figure,
    render_scene,
)
from controlkit.errors import ConfigError

WRITTEN = [("scene", "depth"), ("scene", "normal"), ("scene", "none"), ("figure", "pose"), ("circles", "outline"),
           ("scene", "image")]  # fmt: skip


@pytest.mark.parametrize("kind, condition", WRITTEN)
def test_write_dataset_reads_back(tmp_path, kind, condition):
    from PIL import Image

    from controlkit.demo.toyworld.dataset import write_dataset
    from training.data.sources import load_pairs

    manifest = write_dataset(tmp_path / "toy", 5, kind=kind, condition=condition, size=64, seed=3)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 5
    pairs = load_pairs(manifest)
    assert [pair.prompt for pair in pairs] == [record["prompt"] for record in records]
    for record, pair in zip(records, pairs):
        assert Image.open(pair.image).size == (64, 64)
        assert (pair.condition is None) == (condition == "none")
        if pair.condition:
            assert Image.open(pair.condition).mode == "RGB"
        truth = np.load(manifest.parent / record["truth"])
        if kind != "circles":
            assert truth["depth"].shape == (64, 64) and len(record["objects"]) >= 1
    sample = {"scene": render_scene, "figure": render_figure, "circles": render_circles}[kind]((3, 4), size=64)
    np.testing.assert_array_equal(np.asarray(Image.open(pairs[4].image)), sample.image)
    if kind == "figure":
        from preprocessors.openpose import load_openpose_json

        pose = load_openpose_json(manifest.parent / records[4]["keypoints"])
        flat = np.array(pose["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
        visible = sample.keypoints[:, 2] > 0
        np.testing.assert_allclose(flat[visible], sample.keypoints[visible], atol=1e-5)
        assert (flat[~visible] == 0).all()
        np.testing.assert_allclose(truth["keypoints"], sample.keypoints)


def test_write_dataset_is_idempotent_and_resumes(tmp_path):
    from controlkit.demo.toyworld.dataset import write_dataset

    folder = tmp_path / "toy"
    manifest = write_dataset(folder, 4, kind="scene", condition="depth")
    first = manifest.read_text()
    stamps = {path: path.stat().st_mtime_ns for path in folder.rglob("*.png")}
    assert write_dataset(folder, 4, kind="scene", condition="depth").read_text() == first
    assert {path: path.stat().st_mtime_ns for path in folder.rglob("*.png")} == stamps  # nothing rewritten

    # An interrupted run: a partial manifest whose last line was cut, and a lost image.
    lines = first.splitlines()
    manifest.unlink()
    (folder / "manifest.jsonl.partial").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    longer = write_dataset(folder, 6, kind="scene", condition="depth").read_text().splitlines()
    assert longer[:4] == lines and len(longer) == 6 and not (folder / "manifest.jsonl.partial").exists()
    (folder / "images" / "000005.png").unlink()
    assert write_dataset(folder, 6, kind="scene", condition="depth").read_text().splitlines() == longer
    assert write_dataset(folder, 2, kind="scene", condition="depth").read_text().splitlines() == lines[:2]


def test_write_dataset_refuses_bad_settings(tmp_path):
    from controlkit.demo.toyworld.dataset import write_dataset

    write_dataset(tmp_path / "toy", 1, kind="circles", condition="outline")
    with pytest.raises(ConfigError, match="other settings"):
        write_dataset(tmp_path / "toy", 1, kind="circles", condition="outline", seed=1)
    with pytest.raises(ConfigError, match="`condition` for kind 'scene' must be one of"):
        write_dataset(tmp_path / "other", 1, kind="scene", condition="pose")
    with pytest.raises(ConfigError, match="`kind` must be one of"):
        write_dataset(tmp_path / "other", 1, kind="torus")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a toy dataset"):
        write_dataset(tmp_path / "full", 1)
