"""`training.data.checks.check_pairs`: every bad pair found in input order, problems counted by category,
warnings for blank maps, the same report from worker processes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
from PIL import Image

from training.data.checks import CATEGORIES, check_pairs, problem_category
from training.data.dataset import load_pairs


@pytest.fixture()
def pairs(tmp_path):
    """A manifest of one good pair and one pair per kind of problem (and a blank map, which only warns)."""
    photo = np.ascontiguousarray(skimage.data.astronaut()[::8, ::8])  # (64, 64, 3)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    Image.fromarray(photo).save(tmp_path / "map.png")
    Image.fromarray(photo[:, :40]).save(tmp_path / "narrow.png")
    Image.fromarray(np.zeros_like(photo)).save(tmp_path / "blank.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    records = [
        {"image": "photo.png", "condition": "map.png", "prompt": "good"},
        {"image": "photo.png", "condition": "gone.png", "prompt": "missing map"},
        {"image": "corrupt.png", "condition": "map.png", "prompt": "corrupt image"},
        {"image": "photo.png", "condition": "narrow.png", "prompt": "mismatch"},
        {"image": "photo.png", "condition": "map.png", "prompt": " "},
        {"image": "photo.png", "prompt": "no map"},
        {"image": "photo.png", "condition": "blank.png", "prompt": "blank"},
        {"image": "gone.png", "condition": "corrupt.png", "prompt": "two problems"},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return load_pairs(tmp_path / "m.jsonl")


def test_every_bad_pair_with_its_problems_in_input_order(pairs):
    report = check_pairs(pairs)
    assert report.pairs == 8 and not report.ok
    assert [key for key, _ in report.bad] == [pairs[index].key for index in (1, 2, 3, 4, 5, 7)]
    assert [len(found) for _, found in report.bad] == [1, 1, 1, 1, 1, 2]
    missing, corrupt, mismatch, caption, no_map, both = (found for _, found in report.bad)
    assert missing[0].startswith("condition: ") and "no such file" in missing[0]
    assert corrupt[0].startswith("image: ")
    assert "size mismatch: image is 64x64 but condition is 40x64" in mismatch[0]
    assert caption == ["empty caption; write one for this image"]
    assert "no condition map" in no_map[0]
    assert both[0].startswith("image: ") and "no such file" in both[0] and both[1].startswith("condition: ")
    assert report.warned == [(pairs[6].key, ["blank condition map (every pixel 0): nothing was detected"])]


def test_problems_are_counted_by_category_and_summarised_in_order(pairs):
    report = check_pairs(pairs)
    # counts keep the order categories were first met; the summary follows CATEGORIES
    assert report.counts == {"missing file": 2, "corrupt image": 2, "size mismatch": 1, "empty caption": 1,
                             "no condition": 1}
    assert list(report.counts) == ["missing file", "corrupt image", "size mismatch", "empty caption", "no condition"]
    assert report.summary() == [(name, report.counts[name]) for name, _ in CATEGORIES]
    assert check_pairs(pairs[:1]).summary() == [] and check_pairs(pairs[:1]).ok


def test_problem_categories():
    assert problem_category("image: /x.png: no such file") == "missing file"
    assert problem_category("condition: /x.png: truncated or corrupt (cannot decode)") == "corrupt image"
    assert problem_category("size mismatch: image is 1x1 but condition is 2x1") == "size mismatch"
    assert problem_category("empty caption; write one for this image") == "empty caption"
    assert problem_category("no condition map, and no preprocessor configured to compute one") == "no condition"


def test_computed_conditions_accept_pairs_without_a_map(pairs):
    report = check_pairs(pairs, conditions_computed=True)
    assert "no condition" not in report.counts and len(report.bad) == 5
    assert check_pairs(pairs[5:6], conditions_computed=True).ok


def test_worker_processes_give_the_same_report(pairs):
    assert check_pairs(pairs, workers=2) == check_pairs(pairs)
