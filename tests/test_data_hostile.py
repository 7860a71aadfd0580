"""Hostile datasets and options: manifests split on newlines only, bytes that are not UTF-8, folders searched the
same way by `dataset check` and `dataset build`, captions, output folders and option ranges checked before work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
from PIL import Image

from controlkit.cli import main
from controlkit.errors import ConfigError
from training.data.building import build_dataset
from training.data.checks import check_pairs
from training.data.dataset import PairedDataset, load_pairs, make_condition_fn


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.ascontiguousarray(skimage.data.astronaut()[::8, ::8])  # (64, 64, 3)


def test_manifest_lines_end_at_newlines_only(tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "a.png")
    captions = ["a line\u2028separator", "a next\u0085line", "a\u000bvertical tab and\u001cfile separator"]
    lines = [json.dumps({"image": "a.png", "condition": "a.png", "prompt": text}, ensure_ascii=False)
             for text in captions]
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    pairs = load_pairs(tmp_path / "m.jsonl")
    assert [pair.prompt for pair in pairs] == captions
    assert check_pairs(pairs).ok


def test_a_byte_that_is_not_utf8_is_one_line_naming_the_line(tmp_path, capsys):
    good = json.dumps({"image": "a.png", "prompt": "ok"}).encode()
    (tmp_path / "m.jsonl").write_bytes(good + b"\n" + b'{"image": "b.png", "prompt": "caf\xe9"}\n' + good + b"\n")
    with pytest.raises(ConfigError, match=r"m\.jsonl: line 2: not UTF-8 text \(byte 0xe9 at column 34\)$"):
        load_pairs(tmp_path / "m.jsonl")
    assert main(["dataset", "check", str(tmp_path / "m.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 2: not UTF-8 text" in err and err.count("\n") == 1


def _photos(root, photo, captions: bool = True):
    """photos/top.png and photos/sub/deep.png (+ .txt captions)."""
    (root / "sub").mkdir(parents=True)
    for path in (root / "top.png", root / "sub" / "deep.png"):
        Image.fromarray(photo).save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"a photo called {path.stem}")
    return root


def test_check_of_a_folder_finds_the_images_build_annotates(tmp_path, photo, capsys):
    photos = _photos(tmp_path / "photos", photo)
    assert [pair.key for pair in load_pairs(photos)] == ["sub/deep.png", "top.png"]  # sorted by path, as build
    assert main(["dataset", "check", str(photos), "-p", "canny"]) == 0
    assert capsys.readouterr().out.strip().endswith("2 pairs, 0 bad")
    built = build_dataset(photos, "canny", tmp_path / "pairs")
    assert [record["image"] for record in built.records] == ["../photos/sub/deep.png", "../photos/top.png"]
    assert main(["dataset", "check", str(tmp_path / "pairs")]) == 0


def test_a_layout_pairs_nested_images_and_maps_by_their_relative_stem(tmp_path, photo):
    for folder in ("images/sub", "conditions/sub"):
        (tmp_path / folder).mkdir(parents=True)
    Image.fromarray(photo).save(tmp_path / "images" / "sub" / "cat.jpg")
    Image.fromarray(photo).save(tmp_path / "conditions" / "sub" / "cat.png")
    (tmp_path / "images" / "sub" / "cat.txt").write_text("a cat")
    (pair,) = load_pairs(tmp_path)
    assert (pair.key, pair.condition, pair.prompt) == ("images/sub/cat.jpg",
                                                       str(tmp_path / "conditions" / "sub" / "cat.png"), "a cat")


def test_a_caption_file_that_is_not_utf8_is_that_pairs_problem_only(tmp_path, photo, capsys):
    photos = _photos(tmp_path / "photos", photo)
    (photos / "top.txt").write_bytes(b"caf\xe9")
    assert main(["dataset", "check", str(photos), "-p", "canny"]) == 1
    out = capsys.readouterr().out
    assert "top.png: empty caption: top.txt is not UTF-8 text (byte 3); re-save it as UTF-8" in out
    assert out.strip().endswith("2 pairs, 1 bad (1 empty caption)")
    dataset = PairedDataset(load_pairs(photos), resolution=64, condition_fn=make_condition_fn("canny"))
    assert dataset[0] is not None and dataset[1] is None and "not UTF-8" in dataset.bad_pairs[0][1]  # sub/deep, top


def test_build_without_any_caption_is_refused_before_any_work(tmp_path, photo, capsys):
    photos = _photos(tmp_path / "photos", photo, captions=False)
    with pytest.raises(ConfigError, match=r"no image in .*photos has a caption: caption_from 'txt' reads same-stem "
                                          r"\.txt files \(e\.g\. deep\.txt\)"):
        build_dataset(photos, "canny", tmp_path / "pairs")
    assert not (tmp_path / "pairs").exists()
    assert main(["dataset", "build", str(photos), "-p", "canny", "-o", str(tmp_path / "cli"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no image in ") and "--caption-from filename" in err and err.count("\n") == 1
    assert not (tmp_path / "cli" / "conditions").exists()
    assert main(["dataset", "build", str(photos), "-p", "canny", "-o", str(tmp_path / "cli"), "--quiet",
                 "--caption-from", "filename"]) == 0


def test_build_output_problems_are_found_before_any_work(tmp_path, photo, capsys):
    photos = _photos(tmp_path / "photos", photo)
    (tmp_path / "file").write_text("x")
    for output, code, message in [
        (tmp_path / "file", 1, "error: -o {}: is a file, not a folder"),
        (tmp_path / "file" / "out", 1, "error: -o {}: cannot write there (a part of the path is a file"),
        (photos / "pairs", 2, "-o {} lies inside IMAGES_DIR"),
    ]:
        assert main(["dataset", "build", str(photos), "-p", "canny", "-o", str(output), "--quiet"]) == code
        captured = capsys.readouterr()
        assert message.format(output) in captured.err and "maps written" not in captured.out
    assert not (photos / "pairs").exists()
    with pytest.raises(ConfigError, match="lies inside images_dir"):
        build_dataset(photos, "canny", photos / "pairs")


def test_an_unwritable_condition_cache_does_not_make_pairs_bad(tmp_path, photo):
    photos = _photos(tmp_path / "photos", photo)
    (tmp_path / "file").write_text("x")
    dataset = PairedDataset(load_pairs(photos), resolution=64, condition_fn=make_condition_fn("canny"),
                            cache_dir=tmp_path / "file" / "cache")
    assert dataset[0] is not None and dataset[1] is not None and dataset.bad_pairs == []


@pytest.mark.parametrize("argv, message", [
    (["dataset", "check", "x.jsonl", "--workers", "100000"], "--workers must be in [1, 128], got 100000"),
    (["eval", "--base", "b", "--controlnet", "canny=c", "--data", "d", "--steps", "5000"],
     "--steps must be in [1, 1000], got 5000"),
    (["eval", "--base", "b", "--controlnet", "canny=c", "--data", "d", "--seed", "-1"],
     "--seed must be in [0, 2**63), got -1"),
    (["eval", "--base", "b", "--controlnet", "canny=c", "--data", "d", "--guidance", "nan"],
     "--guidance must be a finite number >= 0, got nan"),
    (["eval", "--base", "b", "--controlnet", "canny=c", "--data", "d", "--scale", "inf"],
     "--scale must be in [0, 10.0], got inf"),
    (["eval", "--base", "b", "--controlnet", "canny=c", "--data", "d", "--resolution", "65536"],
     "--resolution must be a positive multiple of 8 up to 8192, got 65536"),
])
def test_option_ranges_are_usage_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_eval_checks_its_output_folder_before_loading_anything(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv = ["eval", "--base", str(tmp_path / "no-base"), "--controlnet", "canny=c", "--data", str(tmp_path),
            "--output", str(tmp_path / "file")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output {tmp_path / 'file'}: is a file") and err.count("\n") == 1
