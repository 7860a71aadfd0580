"""Aspect-ratio buckets: the bucket table, one resize and crop for image and map, the crop recorded for SDXL,
one bucket per step in a deterministic order, and a bucketed run that resumes bitwise."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import load_tensors, make_world, tiny_config

from training.data.batching import BatchLayout
from training.data.buckets import BucketSampler, bucket_sizes, nearest_bucket
from training.data.dataset import PairedDataset, load_pairs
from training.engine.trainer import train

TINY_MODELS = True  # one torch thread for this module (tests/conftest.py)

#: (width, height) of the bucketed pairs: wide ones go to 192 x 64, tall ones to 64 x 256 at resolution 128.
SHAPES = [(200, 60), (64, 250), (190, 66), (60, 220), (210, 64), (70, 256), (180, 62), (58, 230)]


@pytest.mark.parametrize("resolution", [128, 512, 1024])
def test_buckets_have_sides_of_64_and_about_the_configured_area(resolution):
    sizes = bucket_sizes(resolution)
    assert (resolution, resolution) in sizes
    for width, height in sizes:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= resolution**2 and max(width / height, height / width) <= 4
    if resolution >= 512:  # where 64-pixel steps are fine enough, every bucket holds at least 80% of the area
        assert min(width * height for width, height in sizes) >= 0.8 * resolution**2
    assert nearest_bucket(1600, 900, bucket_sizes(1024)) == (1344, 768)  # 16:9 -> 1.75, SDXL's 1344 x 768
    assert nearest_bucket(900, 1600, bucket_sizes(1024)) == (768, 1344)


@pytest.fixture(scope="module")
def bucket_pairs(tmp_path_factory):
    """Pairs of wide and tall images whose condition map is the image itself, with captions."""
    folder = tmp_path_factory.mktemp("bucket-pairs")
    rng = np.random.default_rng(0)
    lines = []
    for number, (width, height) in enumerate(SHAPES):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{number}.png")
        lines.append(json.dumps({"image": f"{number}.png", "condition": f"{number}.png", "prompt": f"shape {number}"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


def test_image_and_map_get_one_resize_and_crop_and_the_crop_is_recorded(bucket_pairs):
    from training.data.buckets import assign_buckets

    pairs = load_pairs(bucket_pairs)
    buckets = assign_buckets([pair.image for pair in pairs], 128)
    assert buckets == [(192, 64), (64, 256)] * 4
    for center in (True, False):
        dataset = PairedDataset(pairs, resolution=128, buckets=buckets, center_crop=center, seed=3)
        for index in (0, 1, 2):
            item = dataset[index]
            width, height = buckets[index]
            assert item["pixel_values"].shape == item["conditioning_pixel_values"].shape == (3, height, width)
            torch.testing.assert_close((item["pixel_values"] + 1) / 2, item["conditioning_pixel_values"],
                                       rtol=0, atol=1e-6)  # the same pixels, so the same resize and crop
            assert item["original_size"] == SHAPES[index][::-1] and item["target_size"] == (height, width)
    # pair 0 is 200 x 60, scaled by 64 / 60 to 213 x 64: the centred crop starts at x = round(21 / 2) = 10
    assert PairedDataset(pairs, resolution=128, buckets=buckets)[0]["crop_top_left"] == (0, 10)


def test_sdxl_time_ids_carry_the_bucket_as_target_size():
    from training.engine.batch_encoder import size_time_ids

    rows = size_time_ids([(60, 200), (250, 64)], [(0, 10), (3, 0)], 128, [(64, 192), (256, 64)])
    assert rows.tolist() == [[60, 200, 0, 10, 64, 192], [250, 64, 3, 0, 256, 64]]


def test_one_bucket_per_step_in_an_order_that_is_a_function_of_seed_and_step():
    buckets = [(192, 64), (64, 256)] * 10 + [(128, 128)]  # the square one never fills a global batch of 4
    layout = BatchLayout(batch_size=2, num_processes=1, accumulation=2)
    sampler, again = BucketSampler(range(21), buckets, layout, 7), BucketSampler(range(21), buckets, layout, 7)
    assert sampler.steps_per_epoch == 4  # 10 // 4 + 10 // 4
    seen = []
    for step in range(8):
        indices = sampler.step_indices(step)
        assert len({buckets[index] for index in indices}) == 1 and sampler.step_size(step) == buckets[indices[0]]
        assert indices == again.step_indices(step)
        seen.append(indices)
    epoch_zero = [index for indices in seen[:4] for index in indices]
    assert len(set(epoch_zero)) == 16 and 20 not in epoch_zero
    assert seen[:4] != seen[4:]  # another epoch, another order
    assert {sampler.step_size(step) for step in range(4)} == {(192, 64), (64, 256)}
    assert BucketSampler(range(21), buckets, layout, 8).step_indices(0) != seen[0] or \
        BucketSampler(range(21), buckets, layout, 8).step_indices(1) != seen[1]


def test_a_bucketed_run_resumes_bitwise(bucket_pairs, tmp_path_factory):
    base, _ = make_world(tmp_path_factory.mktemp("world"), pairs=2)
    settings = ("data.buckets=true", "data.resolution=128", "train.max_steps=4", "train.batch_size=2",
                "data.center_crop=false")
    straight_dir, resumed_dir = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    straight = train(tiny_config(base, bucket_pairs, straight_dir, *settings))

    def stop_at_two(done: int) -> None:
        if done == 2:
            signal.raise_signal(signal.SIGTERM)

    stopped = train(tiny_config(base, bucket_pairs, resumed_dir, *settings), on_step=stop_at_two)
    assert stopped.step == 2
    resumed = train(tiny_config(base, bucket_pairs, resumed_dir, *settings, "checkpoint.resume=latest"))
    assert resumed.losses == straight.losses[2:]
    name = "controlnet/diffusion_pytorch_model.safetensors"
    expected, actual = load_tensors(straight_dir / name), load_tensors(resumed_dir / name)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_bucket_settings_are_checked_up_front(tmp_path):
    from controlkit.errors import ConfigError

    with pytest.raises(ConfigError, match="`data.resolution` must be a multiple of 64 with data.buckets"):
        tiny_config(tmp_path, tmp_path / "m.jsonl", tmp_path / "out", "data.buckets=true", "data.resolution=96")
