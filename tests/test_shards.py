"""WebDataset shards: `dataset build --format webdataset` (folder in, img2dataset shards in), the index, resume,
bad samples, and `dataset check` / `load_pairs` reading shards by path, pattern and fsspec URL."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from controlkit.cli import main
from training.data.dataset import load_pairs
from training.data.shard_writer import build_shards


@pytest.fixture()
def photos(tmp_path):
    from skimage import data

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(data.coffee()[:96, :128]).save(folder / "coffee.jpg", quality=95)
    Image.fromarray(data.chelsea()[:80, :112]).save(folder / "sub" / "cat.png")
    Image.fromarray(data.astronaut()[:64, :64]).save(folder / "astro.png")
    for name, text in (("coffee", "a cup of coffee"), ("sub/cat", "a cat"), ("astro", "an astronaut")):
        (folder / f"{name}.txt").write_text(text)
    return folder


def _members(path):
    with tarfile.open(path) as archive:
        return {member.name: archive.extractfile(member).read() for member in archive.getmembers()}


def test_folder_to_shards_holds_image_map_caption_and_record(photos, tmp_path):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (photos / "broken.txt").write_text("broken")
    out = tmp_path / "shards"
    report = build_shards(photos, "canny", out, shard_size=2, params={"low_threshold": 50})
    assert report.written == ["pairs-000000.tar", "pairs-000001.tar"] and report.samples == 3
    assert [name for name, _ in report.failed] == ["broken.png"] and "broken.png" in report.failed[0][1]
    index = json.loads((out / "shards.json").read_text())
    assert index["format"] == "controlkit-webdataset" and index["samples"] == 3
    assert [(entry["url"], entry["samples"]) for entry in index["shards"]] == [("pairs-000000.tar", 1),
                                                                            ("pairs-000001.tar", 2)]
    # image_files order: astro, broken (left out), coffee, sub/cat; keys are the sample's number in that order
    second = _members(out / "pairs-000001.tar")
    assert sorted(name for name in second if name.startswith("000000003")) == [
        "000000003.condition.png", "000000003.json", "000000003.png", "000000003.txt"]
    assert "000000002.jpg" in second
    assert second["000000003.png"] == (photos / "sub" / "cat.png").read_bytes()  # the original bytes
    assert second["000000003.txt"] == b"a cat"
    record = json.loads(second["000000003.json"])
    assert record == {"key": "000000003", "source": "sub/cat.png", "image": [112, 80], "condition": [112, 80],
                      "preprocessor": "canny", "params": {"low_threshold": 50}}
    # the condition map is the folder format's map, byte for byte
    assert main(["annotate", str(photos / "sub" / "cat.png"), "-p", "canny", "--set", "low_threshold=50",
                 "-o", str(tmp_path / "maps"), "--quiet"]) == 0
    assert second["000000003.condition.png"] == (tmp_path / "maps" / "cat.png").read_bytes()


def test_rerun_keeps_finished_shards_and_rewrites_missing_or_replanned_ones(photos, tmp_path):
    out = tmp_path / "shards"
    build_shards(photos, "canny", out, shard_size=2)
    first = (out / "pairs-000000.tar").stat().st_mtime_ns
    (out / "pairs-000001.tar").unlink()
    again = build_shards(photos, "canny", out, shard_size=2)
    assert again.skipped == ["pairs-000000.tar"] and again.written == ["pairs-000001.tar"] and again.samples == 3
    assert (out / "pairs-000000.tar").stat().st_mtime_ns == first
    changed = build_shards(photos, "canny", out, shard_size=2, params={"low_threshold": 10})
    assert changed.written == ["pairs-000000.tar", "pairs-000001.tar"]  # another parameter: another plan
    assert not list(out.glob(".ck-*"))


def test_dataset_check_reads_shards_by_index_pattern_and_url(photos, tmp_path, capsys):
    out = tmp_path / "shards"
    build_shards(photos, "canny", out, shard_size=2)
    for source in (str(out), str(out / "shards.json"), str(out / "pairs-{000000..000001}.tar"),
                   f"file://{out}/shards.json"):
        assert main(["dataset", "check", source]) == 0, source
        assert f"{source}: 3 pairs, 0 bad" in capsys.readouterr().out
    pairs = load_pairs(f"file://{out}")
    assert len(pairs) == 3 and [pair.key for pair in pairs[:2]] == ["pairs-000000.tar:000000000",
                                                                  "pairs-000000.tar:000000001"]
    assert pairs[2].prompt == "a cat" and pairs[2].condition.startswith(b"\x89PNG")


def _img2dataset_shard(path, samples):
    """A shard as img2dataset writes them: KEY.jpg, KEY.txt, KEY.json."""
    with tarfile.open(path, "w") as archive:
        for key, (image, caption) in samples.items():
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=90)
            record = json.dumps({"url": f"http://example.invalid/{key}.jpg", "caption": caption}).encode()
            for suffix, data in (("jpg", buffer.getvalue()), ("txt", caption.encode()), ("json", record)):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def test_img2dataset_shards_are_annotated_into_condition_shards(tmp_path, capsys):
    from skimage import data

    source = tmp_path / "laion"
    source.mkdir()
    rgb = data.astronaut()
    _img2dataset_shard(source / "00000.tar", {"000000000": (rgb[:64, :80], "an astronaut"),
                                              "000000001": (rgb[100:164, 100:164], "a face")})
    _img2dataset_shard(source / "00001.tar", {"000010000": (rgb[200:248, :96], "a suit")})
    (source / "00002.tar").write_bytes(b"not a tar file at all" * 30)
    out = tmp_path / "canny"
    code = main(["dataset", "build", str(source / "{00000..00002}.tar"), "-p", "canny", "-o", str(out),
                 "--format", "webdataset", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1 and "failed: " in captured.err and "00002.tar" in captured.err  # the bad shard, by name
    assert "2 shards written" not in captured.out and "3 samples" in captured.out
    members = _members(out / "00000.tar")
    assert {"000000000.jpg", "000000000.condition.png", "000000001.txt"} <= set(members)
    record = json.loads(members["000000000.json"])
    assert record["original"]["url"].endswith("000000000.jpg") and record["image"] == [80, 64]
    pairs = load_pairs(out)
    assert [pair.key for pair in pairs] == ["00000.tar:000000000", "00000.tar:000000001", "00001.tar:000010000"]
    assert main(["dataset", "check", str(out)]) == 0


def test_bad_samples_in_shards_are_reported_by_name(photos, tmp_path, capsys):
    out = tmp_path / "shards"
    build_shards(photos, "canny", out, shard_size=3)
    members = _members(out / "pairs-000000.tar")
    members["000000001.jpg"] = b"\xff\xd8\xff truncated"
    members["000000002.txt"] = b""
    with tarfile.open(out / "pairs-000000.tar", "w") as archive:
        for name, payload in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    assert main(["dataset", "check", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("pairs-000000.tar:000000001: image:") for line in lines)
    assert "pairs-000000.tar:000000002: empty caption; write one for this image" in lines
    assert lines[-1].endswith("3 pairs, 2 bad (1 corrupt image, 1 empty caption)")


def test_shard_sources_are_checked_before_any_work(tmp_path):
    from controlkit.errors import ConfigError

    with pytest.raises(ConfigError, match="nothing-here.tar: no such shard"):
        load_pairs(tmp_path / "nothing-here.tar")
    (tmp_path / "shards.json").write_text('{"shards": []}')
    with pytest.raises(ConfigError, match="not a shard index"):
        load_pairs(tmp_path / "shards.json")
    image = np.zeros((8, 8, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    assert main(["dataset", "build", str(tmp_path), "-p", "canny", "-o", str(tmp_path / "o"),
                 "--format", "webdataset", "--shard-size", "0"]) == 2
