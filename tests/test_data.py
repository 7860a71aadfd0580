"""Paired training data: every source format, the shared transform, bad pairs, randomised and cached conditions."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from controlkit.errors import ConfigError, ControlkitError
from controlkit.image import load_image
from training.data.dataset import PairedDataset, check_pair, collate_pairs, load_pairs, make_condition_fn

CANNY_RANDOM = {"low_threshold": (50, 150), "high_threshold": (150, 250)}


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photo, non-square so that resize and crop matter: (256, 192, 3) uint8."""
    return np.ascontiguousarray(skimage.data.astronaut()[::2, 64:448:2])


def save(path, array) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def write_lines(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


# --- source formats -------------------------------------------------------------------------------------------


def test_manifest_paths_are_relative_to_its_folder_and_condition_is_optional(tmp_path, photo):
    save(tmp_path / "img" / "a.png", photo)
    save(tmp_path / "cond" / "a.png", photo)
    write_lines(tmp_path / "train.jsonl", [
        {"image": "img/a.png", "condition": "cond/a.png", "prompt": "an astronaut"},
        {"image": "img/a.png", "prompt": "no map yet"},
    ])
    pairs = load_pairs(tmp_path / "train.jsonl")
    assert [(p.image, p.condition, p.prompt, p.key) for p in pairs] == [
        (str(tmp_path / "img/a.png"), str(tmp_path / "cond/a.png"), "an astronaut", "img/a.png"),
        (str(tmp_path / "img/a.png"), None, "no map yet", "img/a.png"),
    ]
    assert load_pairs(tmp_path / "train.jsonl") == pairs
    (tmp_path / "built").mkdir()
    write_lines(tmp_path / "built" / "manifest.jsonl", [{"image": "x.png", "prompt": "p"}])
    assert load_pairs(tmp_path / "built")[0].image == str(tmp_path / "built" / "x.png")


def test_fill50k_prompt_json_file_and_folder(tmp_path):
    write_lines(tmp_path / "prompt.json", [
        {"source": "source/0.png", "target": "target/0.png", "prompt": "pale golden rod circle"},
        {"source": "source/1.png", "target": "target/1.png", "prompt": "light coral circle"},
    ])
    for source in (tmp_path / "prompt.json", tmp_path):
        pairs = load_pairs(source)
        assert [p.image for p in pairs] == [str(tmp_path / "target/0.png"), str(tmp_path / "target/1.png")]
        assert [p.condition for p in pairs] == [str(tmp_path / "source/0.png"), str(tmp_path / "source/1.png")]
        assert pairs[1].prompt == "light coral circle"


def test_malformed_manifest_lines_are_all_listed(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "prompt": "ok"}\nnot json\n{"prompt": "no image"}\n')
    with pytest.raises(ConfigError, match=r"line 2: not JSON.*line 3: needs an 'image'"):
        load_pairs(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="no such file"):
        load_pairs(tmp_path / "missing.jsonl")


def test_folder_layout_with_txt_captions_and_a_missing_condition(tmp_path, photo):
    save(tmp_path / "images" / "a.png", photo)
    save(tmp_path / "images" / "b.jpg", photo)
    (tmp_path / "images" / "a.txt").write_text("  caption a \n")
    save(tmp_path / "conditions" / "a.png", photo)
    pairs = load_pairs(tmp_path)
    assert [(p.key, p.prompt) for p in pairs] == [("images/a.png", "caption a"), ("images/b.jpg", "")]
    assert pairs[0].condition == str(tmp_path / "conditions" / "a.png")
    problems = check_pair(pairs[1]).problems
    assert any(p.startswith("condition:") and "no such file" in p for p in problems)
    assert any("empty caption" in p for p in problems)
    assert check_pair(pairs[0]).problems == []


def test_folder_layout_with_captions_jsonl_and_computed_conditions(tmp_path, photo):
    save(tmp_path / "images" / "a.png", photo)
    write_lines(tmp_path / "captions.jsonl", [{"stem": "a", "prompt": "from jsonl"}])
    (pair,) = load_pairs(tmp_path)
    assert (pair.condition, pair.prompt) == (None, "from jsonl")
    assert check_pair(pair).problems == ["no condition map, and no preprocessor configured to compute one"]
    assert check_pair(pair, conditions_computed=True).problems == []


def test_flat_folder_of_images_and_captions(tmp_path, photo):
    save(tmp_path / "cat.png", photo)
    save(tmp_path / "dog.webp", photo)
    (tmp_path / "cat.txt").write_text("a cat")
    (tmp_path / "notes.md").write_text("ignored")
    pairs = load_pairs(tmp_path)
    assert [(p.key, p.condition, p.prompt) for p in pairs] == [("cat.png", None, "a cat"), ("dog.webp", None, "")]


def test_hugging_face_dataset_with_diffusers_columns(tmp_path, photo):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({
        "image": [Image.fromarray(photo), Image.fromarray(photo[::-1])],
        "conditioning_image": [Image.fromarray(photo), Image.fromarray(photo[::-1])],
        "text": ["first", " second "],
    }).cast_column("image", datasets.Image()).cast_column("conditioning_image", datasets.Image())
    data.save_to_disk(str(tmp_path / "hf"))
    pairs = load_pairs(tmp_path / "hf")
    assert [(p.key, p.prompt) for p in pairs] == [("row 0", "first"), ("row 1", "second")]
    item = PairedDataset(pairs, resolution=64)[1]
    assert torch.allclose(item["conditioning_pixel_values"] * 2 - 1, item["pixel_values"], atol=1e-6)
    with pytest.raises(ConfigError, match="no column.*caption"):
        load_pairs(tmp_path / "hf", caption_column="caption")


def test_hugging_face_dataset_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ControlkitError, match="pip install datasets"):
        load_pairs(tmp_path / "hf")


# --- the item and the shared transform -------------------------------------------------------------------------


def test_item_shapes_ranges_and_the_same_crop_for_image_and_condition(tmp_path, photo):
    write_lines(tmp_path / "m.jsonl", [{"image": "a.png", "condition": "c.png", "prompt": "p"}])
    save(tmp_path / "a.png", photo)
    save(tmp_path / "c.png", photo)  # the condition is the image itself, so alignment is exact equality
    for center_crop in (True, False):
        dataset = PairedDataset(load_pairs(tmp_path / "m.jsonl"), resolution=96, center_crop=center_crop, seed=3)
        item = dataset[0]
        assert item["pixel_values"].shape == item["conditioning_pixel_values"].shape == (3, 96, 96)
        assert item["pixel_values"].dtype == torch.float32
        assert -1 <= item["pixel_values"].min() < 0 < item["pixel_values"].max() <= 1
        assert 0 <= item["conditioning_pixel_values"].min() and item["conditioning_pixel_values"].max() <= 1
        assert torch.allclose(item["conditioning_pixel_values"] * 2 - 1, item["pixel_values"], atol=1e-6)
        assert (item["prompt"], item["index"]) == ("p", 0)


def test_center_crop_is_the_middle_of_the_short_side_resize(tmp_path, photo):
    save(tmp_path / "a.png", photo)
    save(tmp_path / "c.png", photo)
    write_lines(tmp_path / "m.jsonl", [{"image": "a.png", "condition": "c.png", "prompt": "p"}])
    item = PairedDataset(load_pairs(tmp_path / "m.jsonl"), resolution=96)[0]
    import cv2

    expected = cv2.resize(photo, (96, 128), interpolation=cv2.INTER_AREA)[16:112]  # 192x256 -> 96x128, crop rows
    got = ((item["pixel_values"].permute(1, 2, 0) + 1) * 127.5).round().numpy().astype(np.uint8)
    np.testing.assert_array_equal(got, expected)


def test_exif_orientation_is_applied_to_the_image_and_the_condition(tmp_path, photo):
    raw = np.ascontiguousarray(np.rot90(photo))  # stored sideways, tagged "rotate 90 CW to display"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(raw).save(tmp_path / "a.jpg", exif=exif, quality=100)
    assert np.abs(load_image(tmp_path / "a.jpg").astype(float) - photo).mean() < 5  # upright again, JPEG noise only
    save(tmp_path / "c.png", load_image(tmp_path / "a.jpg"))  # the upright map of the same pixels
    write_lines(tmp_path / "m.jsonl", [{"image": "a.jpg", "condition": "c.png", "prompt": "p"}])
    item = PairedDataset(load_pairs(tmp_path / "m.jsonl"), resolution=64)[0]
    assert torch.allclose(item["conditioning_pixel_values"] * 2 - 1, item["pixel_values"], atol=1e-6)


def test_a_condition_at_another_scale_of_the_same_aspect_is_accepted(tmp_path, photo):
    save(tmp_path / "a.png", photo)
    save(tmp_path / "half.png", np.asarray(Image.fromarray(photo).resize((96, 128))))
    write_lines(tmp_path / "m.jsonl", [{"image": "a.png", "condition": "half.png", "prompt": "p"}])
    pairs = load_pairs(tmp_path / "m.jsonl")
    assert check_pair(pairs[0]).problems == []
    item = PairedDataset(pairs, resolution=64)[0]
    assert (item["conditioning_pixel_values"] * 2 - 1 - item["pixel_values"]).abs().mean() < 0.05


# --- bad pairs ---------------------------------------------------------------------------------------------------


@pytest.fixture()
def bad_source(tmp_path, photo):
    """Six pairs: one good, then missing, corrupt, truncated, size mismatch, empty caption."""
    save(tmp_path / "good.png", photo)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    Image.fromarray(photo).save(tmp_path / "full.jpg", quality=90)
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:2000])
    save(tmp_path / "square.png", np.zeros((200, 200, 3), np.uint8))
    write_lines(tmp_path / "m.jsonl", [
        {"image": "good.png", "condition": "good.png", "prompt": "good"},
        {"image": "missing.png", "condition": "good.png", "prompt": "missing"},
        {"image": "corrupt.png", "condition": "good.png", "prompt": "corrupt"},
        {"image": "good.png", "condition": "truncated.jpg", "prompt": "truncated"},
        {"image": "good.png", "condition": "square.png", "prompt": "mismatch"},
        {"image": "full.jpg", "condition": "full.jpg", "prompt": "   "},
    ])
    return tmp_path / "m.jsonl"


EXPECTED_REASONS = [
    ("missing.png", "image: .*missing.png: no such file"),
    ("corrupt.png", "image: .*corrupt.png: (truncated or corrupt|not a supported image)"),
    ("good.png", "condition: .*truncated.jpg: truncated or corrupt"),
    ("good.png", "size mismatch: image is 192x256 but condition is 200x200"),
    ("full.jpg", "empty caption"),
]


def test_bad_pairs_are_skipped_counted_and_named(bad_source):
    import re

    dataset = PairedDataset(load_pairs(bad_source), resolution=64)
    items = [dataset[i] for i in range(len(dataset))]
    assert items[0] is not None and items[1:] == [None] * 5
    assert len(dataset.bad_pairs) == 5
    for (key, reason), (expected_key, pattern) in zip(dataset.bad_pairs, EXPECTED_REASONS):
        assert key == expected_key and re.search(pattern, reason), (key, reason)
    batch = collate_pairs(items)
    assert batch["skipped"] == 5 and batch["indices"] == [0] and batch["pixel_values"].shape == (1, 3, 64, 64)
    assert [len(check_pair(pair).problems) for pair in load_pairs(bad_source)] == [0, 1, 1, 1, 1, 1]


def test_fail_fast_names_the_pair_and_the_problem(bad_source):
    dataset = PairedDataset(load_pairs(bad_source), resolution=64, on_bad_pair="fail")
    assert dataset[0] is not None
    with pytest.raises(ControlkitError, match=r"bad pair 'missing.png': image: .*no such file"):
        dataset[1]
    with pytest.raises(ControlkitError, match=r"bad pair 'good.png': size mismatch"):
        dataset[4]


def test_collate_of_an_all_bad_batch_is_empty_and_counted():
    batch = collate_pairs([None, None])
    assert batch["pixel_values"].shape[0] == 0 and batch["prompts"] == [] and batch["skipped"] == 2


def test_dataset_works_in_a_torch_dataloader(bad_source):
    dataset = PairedDataset(load_pairs(bad_source), resolution=64)
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_pairs))
    assert [b["skipped"] for b in batches] == [2, 3] and sum(len(b["prompts"]) for b in batches) == 1


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="multiple of 8"):
        PairedDataset([], resolution=100)
    with pytest.raises(ConfigError, match="on_bad_pair"):
        PairedDataset([], resolution=64, on_bad_pair="ignore")


# --- computed, randomised and cached conditions ------------------------------------------------------------------


def test_make_condition_fn_draws_integers_in_range_and_keeps_low_below_high():
    function = make_condition_fn("canny", randomize={"low_threshold": (50, 220), "high_threshold": (100, 250)})
    rng = np.random.default_rng(0)
    for _ in range(200):
        drawn = function.draw(rng)
        assert type(drawn["low_threshold"]) is int and type(drawn["high_threshold"]) is int
        assert 50 <= drawn["low_threshold"] <= drawn["high_threshold"] <= 250
    assert function.cache_key is None
    assert make_condition_fn("canny", {"low_threshold": 80}).cache_key == 'canny:{"low_threshold": 80}'


def test_make_condition_fn_rejects_bad_names_and_ranges():
    with pytest.raises(ConfigError, match="Unknown preprocessor 'cany'.*Did you mean 'canny'"):
        make_condition_fn("cany")
    with pytest.raises(ConfigError, match="unknown parameter.*threshold.*valid: detect_resolution"):
        make_condition_fn("canny", randomize={"threshold": (1, 2)})
    with pytest.raises(ConfigError, match="low <= high"):
        make_condition_fn("canny", randomize={"low_threshold": (150, 50)})
    with pytest.raises(ConfigError, match="must be between 0"):
        make_condition_fn("canny", {"low_threshold": 250, "high_threshold": 100})


def test_randomised_conditions_repeat_per_seed_epoch_index_and_change_across_epochs(tmp_path, photo):
    save(tmp_path / "a.png", photo)
    save(tmp_path / "b.png", photo[::-1].copy())
    write_lines(tmp_path / "m.jsonl", [{"image": n, "prompt": "p"} for n in ("a.png", "b.png")])
    pairs = load_pairs(tmp_path / "m.jsonl")

    def conditions(epoch, seed=0):
        function = make_condition_fn("canny", randomize=CANNY_RANDOM)
        dataset = PairedDataset(pairs, resolution=128, seed=seed, condition_fn=function)
        dataset.set_epoch(epoch)
        return [dataset[i]["conditioning_pixel_values"] for i in range(len(dataset))]

    first, again, resumed = conditions(1), conditions(1), conditions(1)
    for a, b, c in zip(first, again, resumed):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert set(torch.unique(first[0]).tolist()) <= {0.0, 1.0} and first[0].mean() > 0.01
    other_epoch = conditions(2)
    assert any(not torch.equal(a, b) for a, b in zip(first, other_epoch))
    assert any(not torch.equal(a, b) for a, b in zip(first, conditions(1, seed=7)))


class CountingCondition:
    """A real condition function that counts its calls (the cache must spare them)."""

    def __init__(self, inner):
        self.inner = inner
        self.cache_key = inner.cache_key
        self.calls = 0

    def __call__(self, image, rng):
        self.calls += 1
        return self.inner(image, rng)


def test_computed_conditions_are_cached_and_reused(tmp_path, photo):
    save(tmp_path / "data" / "a.png", photo)
    save(tmp_path / "data" / "b.png", photo[:, ::-1].copy())
    write_lines(tmp_path / "data" / "m.jsonl", [{"image": n, "prompt": "p"} for n in ("a.png", "b.png")])
    pairs = load_pairs(tmp_path / "data" / "m.jsonl")
    counting = CountingCondition(make_condition_fn("canny"))
    dataset = PairedDataset(pairs, resolution=64, condition_fn=counting, cache_dir=tmp_path / "cache")
    first = [dataset[i]["conditioning_pixel_values"] for i in range(2)]
    assert counting.calls == 2 and len(list((tmp_path / "cache").rglob("*.png"))) == 2
    fresh = PairedDataset(pairs, resolution=64, condition_fn=counting, cache_dir=tmp_path / "cache")
    fresh.set_epoch(5)
    second = [fresh[i]["conditioning_pixel_values"] for i in range(2)]
    assert counting.calls == 2 and fresh.cache.hits == 2
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # The cached map is exactly what the function computes.
    uncached = PairedDataset(pairs, resolution=64, condition_fn=make_condition_fn("canny"))[0]
    assert torch.equal(uncached["conditioning_pixel_values"], first[0])
    # Another resolution, or a changed image file, is a different entry; a broken cache file is recomputed.
    PairedDataset(pairs, resolution=32, condition_fn=counting, cache_dir=tmp_path / "cache")[0]
    assert counting.calls == 3
    save(tmp_path / "data" / "a.png", photo[::-1].copy())
    fresh[0]
    assert counting.calls == 4
    for path in (tmp_path / "cache").rglob("*.png"):
        path.write_bytes(b"garbage")
    fresh[1]
    assert counting.calls == 5 and not list((tmp_path / "cache").rglob("*.tmp"))


def test_randomised_conditions_are_not_cached(tmp_path, photo):
    save(tmp_path / "a.png", photo)
    write_lines(tmp_path / "m.jsonl", [{"image": "a.png", "prompt": "p"}])
    counting = CountingCondition(make_condition_fn("canny", randomize=CANNY_RANDOM))
    pairs = load_pairs(tmp_path / "m.jsonl")
    dataset = PairedDataset(pairs, resolution=64, condition_fn=counting, cache_dir=tmp_path / "c")
    dataset[0], dataset[0]
    assert counting.calls == 2 and not (tmp_path / "c").exists()


def test_given_maps_win_over_computed_ones(tmp_path, photo):
    save(tmp_path / "a.png", photo)
    save(tmp_path / "c.png", photo)
    write_lines(tmp_path / "m.jsonl", [{"image": "a.png", "condition": "c.png", "prompt": "p"}])
    counting = CountingCondition(make_condition_fn("canny"))
    item = PairedDataset(load_pairs(tmp_path / "m.jsonl"), resolution=64, condition_fn=counting)[0]
    assert counting.calls == 0
    assert torch.allclose(item["conditioning_pixel_values"] * 2 - 1, item["pixel_values"], atol=1e-6)
