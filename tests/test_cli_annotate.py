"""`controlkit annotate` and `controlkit preprocessors`: outputs, exit codes, resume, bad files."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from controlkit.cli import main


@pytest.fixture()
def photo_folder(tmp_path):
    from skimage import data

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(data.coffee()[:96, :128]).save(folder / "coffee.jpg", quality=95)
    Image.fromarray(data.chelsea()[:80, :112]).save(folder / "sub" / "cat.png")
    Image.fromarray(data.astronaut()[:64, :64]).save(folder / "astro.webp", lossless=True)
    return folder


def test_annotate_folder_writes_png_maps_named_after_inputs(photo_folder, tmp_path, capsys):
    out = tmp_path / "maps"
    assert main(["annotate", str(photo_folder), "-p", "canny", "-o", str(out), "--quiet"]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["astro.png", "coffee.png", "sub/cat.png"]
    cat = np.asarray(Image.open(out / "sub" / "cat.png"))
    assert cat.shape == (80, 112, 3)
    source = np.asarray(Image.open(photo_folder / "sub" / "cat.png").convert("RGB"))
    np.testing.assert_array_equal(cat[..., 0], cv2.Canny(source, 100, 200))
    assert "3 written, 0 already there (skipped), 0 failed" in capsys.readouterr().out


def test_parameters_are_passed_with_set(photo_folder, tmp_path):
    out = tmp_path / "maps"
    main(["annotate", str(photo_folder / "sub" / "cat.png"), "-p", "canny", "--set", "low_threshold=10",
          "--set", "high_threshold=20", "-o", str(out), "--quiet"])
    source = np.asarray(Image.open(photo_folder / "sub" / "cat.png").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "cat.png"))[..., 0], cv2.Canny(source, 10, 20))


def test_rerun_resumes_and_overwrite_recomputes(photo_folder, tmp_path, capsys):
    out = tmp_path / "maps"
    main(["annotate", str(photo_folder), "-p", "canny", "-o", str(out), "--quiet"])
    (out / "coffee.png").unlink()  # as if the run had stopped before this one
    marker = (out / "astro.png").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["annotate", str(photo_folder), "-p", "canny", "-o", str(out), "--quiet"]) == 0
    assert "1 written, 2 already there (skipped)" in capsys.readouterr().out
    assert (out / "coffee.png").exists() and (out / "astro.png").stat().st_mtime_ns == marker
    main(["annotate", str(photo_folder), "-p", "canny", "-o", str(out), "--quiet", "--overwrite"])
    assert "3 written" in capsys.readouterr().out


def test_bad_files_are_reported_and_the_rest_written(photo_folder, tmp_path, capsys):
    (photo_folder / "broken.jpg").write_bytes(b"<html>not found</html>")
    (photo_folder / "empty.png").write_bytes(b"")
    out = tmp_path / "maps"
    assert main(["annotate", str(photo_folder), "-p", "canny", "-o", str(out), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "3 written, 0 already there (skipped), 2 failed" in captured.out
    assert "broken.jpg" in captured.err and "HTML" in captured.err and "empty.png" in captured.err
    assert "Traceback" not in captured.err
    assert not (out / "broken.png").exists() and (out / "coffee.png").exists()


def test_same_stem_inputs_do_not_overwrite_each_other(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (16, 16), (255, 255, 255)).save(folder / "a.png")
    Image.new("RGB", (24, 24), (0, 0, 0)).save(folder / "a.jpg")
    out = tmp_path / "maps"
    assert main(["annotate", str(folder), "-p", "canny", "-o", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg.png", "a.png.png"]


def test_two_workers_give_the_same_maps_as_one(photo_folder, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["annotate", str(photo_folder), "-p", "canny", "-o", str(one), "--quiet"]) == 0
    assert main(["annotate", str(photo_folder), "-p", "canny", "-o", str(two), "--quiet", "--workers", "2"]) == 0
    for path in one.rglob("*.png"):
        twin = two / path.relative_to(one)
        np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(twin)))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-p", "cany"], "Unknown preprocessor 'cany'. Available: "),
        (["-p", "canny", "--set", "threshold=3"], "Valid: detect_resolution, high_threshold, low_threshold"),
        (["-p", "canny", "--set", "novalue"], "expects KEY=VALUE"),
        (["-p", "canny", "--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_usage_errors_exit_2_with_the_valid_choices(photo_folder, tmp_path, capsys, argv, message):
    assert main(["annotate", str(photo_folder), "-o", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_input_exits_1_without_traceback(tmp_path, capsys):
    assert main(["annotate", str(tmp_path / "nowhere"), "-p", "canny", "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere: no such file or folder" in err


def test_json_needs_a_keypoint_preprocessor(photo_folder, tmp_path, capsys):
    assert main(["annotate", str(photo_folder), "-p", "canny", "--json", "-o", str(tmp_path / "o")]) == 1
    assert "does not produce" in capsys.readouterr().err


def test_preprocessors_lists_every_entry_with_status_and_license(capsys):
    from preprocessors import PREPROCESSORS

    assert main(["preprocessors"]) == 0
    out = capsys.readouterr().out
    for name, spec in PREPROCESSORS.items():
        assert f"\n{name}" in f"\n{out}" and spec.license in out
    assert "canny      ready" in out


def test_pose_json_keypoints_are_written_next_to_the_map(tmp_path):
    import json

    from skimage import data

    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    out = tmp_path / "poses"
    assert main(["annotate", str(tmp_path / "astronaut.png"), "-p", "pose", "--json", "-o", str(out), "--quiet"]) == 0
    keypoints = json.loads((out / "astronaut.json").read_text())
    assert keypoints["canvas_width"] == 512 and len(keypoints["people"]) == 1
    nose_x, nose_y, confidence = keypoints["people"][0]["pose_keypoints_2d"][:3]
    assert confidence > 0 and abs(nose_x - 223) < 25 and abs(nose_y - 128) < 25
    assert np.asarray(Image.open(out / "astronaut.png")).max() > 0


def test_preprocessors_verbose_shows_each_parameter_with_its_type(capsys):
    assert main(["preprocessors", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "low_threshold: int = 100" in out and "detect_resolution: int | None = None" in out
    assert "safe: bool = False" in out
