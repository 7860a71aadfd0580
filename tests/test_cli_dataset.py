"""`controlkit dataset check|build`: every bad pair reported, exit codes, JSON, building and resuming."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from controlkit.cli import main
from training.data.dataset import load_pairs


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.ascontiguousarray(skimage.data.astronaut()[::4, ::4])  # (128, 128, 3)


def write_manifest(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


@pytest.fixture()
def layout(tmp_path, photo):
    """A folder layout with one good pair and one pair of each kind of problem."""
    images, conditions = tmp_path / "images", tmp_path / "conditions"
    images.mkdir()
    conditions.mkdir()
    for stem in ("good", "nocond", "mismatch", "nocaption", "truncated"):
        Image.fromarray(photo).save(images / f"{stem}.png")
        if stem != "nocaption":
            (images / f"{stem}.txt").write_text(f"a photo called {stem}")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    (images / "corrupt.txt").write_text("corrupt")
    for stem in ("good", "nocaption", "corrupt"):
        Image.fromarray(photo).save(conditions / f"{stem}.png")
    Image.fromarray(photo[:, :100]).save(conditions / "mismatch.png")
    Image.fromarray(photo).save(tmp_path / "full.jpg")
    (conditions / "truncated.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:1500])
    return tmp_path


def test_check_reports_every_bad_pair_and_exits_1(layout, capsys):
    assert main(["dataset", "check", str(layout)]) == 1
    lines = capsys.readouterr().out.splitlines()
    report = "\n".join(lines)
    assert "images/corrupt.png: image: " in report and "truncated or corrupt" in report
    assert "images/nocond.png: condition: " in report and "no such file" in report
    assert "images/mismatch.png: size mismatch: image is 128x128 but condition is 100x128" in report
    assert "images/nocaption.png: empty caption" in report
    assert "images/truncated.png: condition: " in report
    assert not any(line.startswith("images/good.png") for line in lines)
    assert lines[-1] == (
        f"{layout}: 6 pairs, 5 bad (1 missing file, 2 corrupt image, 1 size mismatch, 1 empty caption)"
    )


def test_check_json_report_and_a_clean_dataset_exits_0(layout, tmp_path, capsys):
    assert main(["dataset", "check", str(layout), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["pairs"], report["bad"]) == (6, 5)
    assert report["problems"] == {"corrupt image": 2, "missing file": 1, "size mismatch": 1, "empty caption": 1}
    assert sorted(entry["key"] for entry in report["bad_pairs"]) == [
        "images/corrupt.png", "images/mismatch.png", "images/nocaption.png", "images/nocond.png",
        "images/truncated.png",
    ]
    write_manifest(tmp_path / "clean.jsonl", [{"image": "images/good.png", "condition": "conditions/good.png",
                                               "prompt": "good"}])
    assert main(["dataset", "check", str(tmp_path / "clean.jsonl")]) == 0
    assert capsys.readouterr().out.strip().endswith("1 pairs, 0 bad")


def test_check_with_a_preprocessor_accepts_pairs_without_maps(tmp_path, photo, capsys):
    Image.fromarray(photo).save(tmp_path / "cat.png")
    (tmp_path / "cat.txt").write_text("a cat")
    assert main(["dataset", "check", str(tmp_path)]) == 1
    assert "no condition map" in capsys.readouterr().out
    assert main(["dataset", "check", str(tmp_path), "-p", "canny"]) == 0
    assert main(["dataset", "check", str(tmp_path), "-p", "cany"]) == 2
    assert "Did you mean 'canny'" in capsys.readouterr().err


def test_check_with_worker_processes_finds_the_same(layout, capsys):
    main(["dataset", "check", str(layout), "--json"])
    serial = json.loads(capsys.readouterr().out)
    assert main(["dataset", "check", str(layout), "--json", "--workers", "2"]) == 1
    assert json.loads(capsys.readouterr().out) == serial


def test_check_warns_about_blank_condition_maps_without_failing(tmp_path, photo, capsys):
    Image.fromarray(photo).save(tmp_path / "person.png")
    Image.fromarray(np.zeros_like(photo)).save(tmp_path / "nobody.png")
    write_manifest(tmp_path / "m.jsonl", [{"image": "person.png", "condition": "nobody.png", "prompt": "p"}])
    assert main(["dataset", "check", str(tmp_path / "m.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "person.png: warning: blank condition map (every pixel 0)" in out
    assert out.strip().endswith("1 pairs, 0 bad; 1 with warnings")


def test_check_of_a_missing_or_malformed_source_is_one_line(tmp_path, capsys):
    assert main(["dataset", "check", str(tmp_path / "nothing.jsonl")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "nothing.jsonl: no such file" in error and len(error.splitlines()) == 1
    (tmp_path / "m.jsonl").write_text("{oops\n")
    assert main(["dataset", "check", str(tmp_path / "m.jsonl")]) == 1
    assert "line 1: not JSON" in capsys.readouterr().err


@pytest.fixture()
def photos(tmp_path, photo):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(photo).save(folder / "red_car-parked.png")
    Image.fromarray(np.ascontiguousarray(photo[:, ::-1])).save(folder / "sub" / "mirror.jpg", quality=95)
    (folder / "sub" / "mirror.txt").write_text("a mirrored astronaut\n")
    (folder / "broken.png").write_bytes(b"<html>404</html>")
    return folder


def test_build_writes_maps_and_a_manifest_that_training_reads(photos, tmp_path, capsys):
    out = tmp_path / "pairs"
    assert main(["dataset", "build", str(photos), "-p", "canny", "-o", str(out), "--quiet",
                 "--set", "low_threshold=50", "--caption-from", "filename"]) == 1  # broken.png failed
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "2 maps written" in captured.out and ": 2 pairs" in captured.out
    pairs = load_pairs(out)
    assert [(p.key, p.prompt) for p in pairs] == [("../photos/red_car-parked.png", "red car parked"),
                                                  ("../photos/sub/mirror.jpg", "mirror")]
    source = np.asarray(Image.open(photos / "red_car-parked.png").convert("RGB"))
    written = np.asarray(Image.open(pairs[0].condition))
    np.testing.assert_array_equal(written[..., 0], cv2.Canny(source, 50, 200))
    assert pairs[1].condition == str(out / "conditions" / "sub" / "mirror.png")


def test_build_captions_from_txt_resumes_and_check_then_passes(photos, tmp_path, capsys):
    (photos / "broken.png").unlink()
    out = tmp_path / "pairs"
    assert main(["dataset", "build", str(photos), "-p", "canny", "-o", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "1 without caption" in captured.out and "no caption: " in captured.err
    assert [p.prompt for p in load_pairs(out)] == ["", "a mirrored astronaut"]
    (photos / "red_car-parked.txt").write_text("a red car")
    stamp = (out / "conditions" / "red_car-parked.png").stat().st_mtime_ns
    assert main(["dataset", "build", str(photos), "-p", "canny", "-o", str(out), "--quiet"]) == 0
    assert "0 maps written, 2 already there" in capsys.readouterr().out
    assert (out / "conditions" / "red_car-parked.png").stat().st_mtime_ns == stamp
    assert [p.prompt for p in load_pairs(out)] == ["a red car", "a mirrored astronaut"]
    assert main(["dataset", "check", str(out)]) == 0


def test_build_usage_errors(photos, tmp_path, capsys):
    assert main(["dataset", "build", str(photos / "red_car-parked.png"), "-p", "canny", "-o", str(tmp_path)]) == 2
    assert "must be a folder" in capsys.readouterr().err
    assert main(["dataset", "build", str(photos), "-p", "canny", "-o", str(tmp_path), "--set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
