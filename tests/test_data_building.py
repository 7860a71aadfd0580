"""`training.data.building.build_dataset`: maps, captions, a manifest that `load_pairs` reads, failures left out,
resuming, and its argument checks."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from controlkit.errors import ConfigError
from training.data.building import build_dataset, caption
from training.data.dataset import load_pairs


@pytest.fixture()
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    photo = np.ascontiguousarray(skimage.data.astronaut()[::8, ::8])  # (64, 64, 3)
    Image.fromarray(photo).save(folder / "red_car-parked.png")
    Image.fromarray(np.ascontiguousarray(photo[:, ::-1])).save(folder / "sub" / "mirror.png")
    (folder / "sub" / "mirror.txt").write_text("  a mirrored astronaut\n")
    (folder / "broken.png").write_bytes(b"<html>404</html>")
    return folder


def test_builds_maps_and_a_manifest_of_the_images_that_worked(photos, tmp_path):
    out = tmp_path / "pairs"
    report = build_dataset(photos, "canny", out, params={"low_threshold": 50})
    assert not report.ok and [source.name for source, _ in report.annotation.failed] == ["broken.png"]
    assert report.manifest == out / "manifest.jsonl"
    assert report.records == [
        {"image": "../photos/red_car-parked.png", "condition": "conditions/red_car-parked.png", "prompt": ""},
        {"image": "../photos/sub/mirror.png", "condition": "conditions/sub/mirror.png",
         "prompt": "a mirrored astronaut"},
    ]
    assert [json.loads(line) for line in report.manifest.read_text().splitlines()] == report.records
    assert report.uncaptioned == [photos / "red_car-parked.png"]
    pairs = load_pairs(out)
    assert [pair.prompt for pair in pairs] == ["", "a mirrored astronaut"]
    source = np.asarray(Image.open(photos / "red_car-parked.png").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(pairs[0].condition))[..., 0], cv2.Canny(source, 50, 200))


def test_captions_from_file_names_and_a_rerun_resumes(photos, tmp_path):
    (photos / "broken.png").unlink()
    out = tmp_path / "pairs"
    first = build_dataset(photos, "canny", out, caption_from="filename")
    assert first.ok and len(first.annotation.written) == 2 and first.uncaptioned == []
    assert [record["prompt"] for record in first.records] == ["red car parked", "mirror"]
    again = build_dataset(photos, "canny", out)
    assert (again.annotation.written, len(again.annotation.skipped)) == ([], 2)
    assert [record["prompt"] for record in again.records] == ["", "a mirrored astronaut"]  # captions re-read
    assert len(build_dataset(photos, "canny", out, overwrite=True).annotation.written) == 2


def test_caption_rules(tmp_path):
    image = tmp_path / "a_b-c  d.png"
    assert caption(image, "filename") == "a b c d"
    assert caption(image, "txt") == ""  # no .txt file
    image.with_suffix(".txt").write_bytes(b"\xff\xfe not utf-8")
    assert caption(image, "txt") == ""
    image.with_suffix(".txt").write_text("\n a cat \n")
    assert caption(image, "txt") == "a cat"


def test_argument_errors(photos, tmp_path):
    with pytest.raises(ConfigError, match="must be a folder"):
        build_dataset(photos / "red_car-parked.png", "canny", tmp_path / "out")
    with pytest.raises(ConfigError, match="caption_from must be one of txt, filename"):
        build_dataset(photos, "canny", tmp_path / "out", caption_from="exif")
    with pytest.raises(ValueError, match="bogus"):
        build_dataset(photos, "canny", tmp_path / "out", params={"bogus": 1})
    assert not (tmp_path / "out").exists()
