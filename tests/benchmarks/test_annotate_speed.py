"""Preprocessor throughput at 512x512 on this machine, against the bare library call doing the same work.

Run: `make benchmark` (or `pytest -m benchmark -s tests/benchmarks/test_annotate_speed.py`). Prints images/s
and the ratio to the peer; asserts the targets of the annotation issue (canny >= 100/s, pose >= 5/s,
HED >= 1/s on this CPU, 2 workers >= 1.7x one worker).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from controlkit.demo.photos import sample_photo
from preprocessors import PREPROCESSORS, get_preprocessor

TARGETS = {"canny": 100.0, "pose": 5.0, "softedge": 1.0}
SCALING_TARGETS = {"canny": 1.7, "pose": 1.7}  # 2 workers against 1, on a 2-core machine


def _distinct_photos(count: int = 8) -> list[np.ndarray]:
    """Different 512x512 images, so that no per-image memo (pose remembers its last image) flatters a rate."""
    photo = sample_photo("astronaut")
    return [np.ascontiguousarray(np.roll(photo, 17 * index, axis=1)) for index in range(count)]


def _rate(function, images: list[np.ndarray], seconds: float = 3.0, minimum: int = 3) -> float:
    function(images[-1])  # warm-up: model load, caches
    count, start = 0, time.perf_counter()
    while count < minimum or time.perf_counter() - start < seconds:
        function(images[count % len(images)])
        count += 1
    return count / (time.perf_counter() - start)


def _peer(name: str):
    """The bare library call that does the same work, where one exists here."""
    import cv2

    if name == "canny":
        return lambda image: cv2.Canny(image, 100, 200)
    return None


@pytest.mark.parametrize("name", sorted(PREPROCESSORS))
def test_images_per_second_at_512(name):
    if PREPROCESSORS[name].check_ready() is not None:
        pytest.skip(f"{name}: {PREPROCESSORS[name].check_ready()}")
    photos = _distinct_photos()
    ours = _rate(get_preprocessor(name), photos)
    peer = _peer(name)
    line = f"{name}: {ours:.2f} images/s at 512x512"
    if peer is not None:
        theirs = _rate(peer, photos)
        line += f"; bare library call {theirs:.2f}/s; ratio ours/peer {ours / theirs:.2f}"
    print(line)
    if name in TARGETS:
        assert ours >= TARGETS[name], line


@pytest.mark.parametrize("name", ["canny", "softedge", "pose"])
def test_folder_with_two_workers(name, tmp_path):
    from preprocessors.batch import annotate_paths

    if PREPROCESSORS[name].check_ready() is not None:
        pytest.skip(f"{name}: {PREPROCESSORS[name].check_ready()}")
    photo = sample_photo("astronaut")
    count = {"canny": 1200, "pose": 240, "softedge": 24}[name]  # enough that worker start-up is amortised
    inputs = tmp_path / "in"
    inputs.mkdir()
    for index in range(count):
        Image.fromarray(np.roll(photo, index * 7, axis=1)).save(inputs / f"in_{index:03d}.png")
    rates = {}
    for workers in (1, 2):
        start = time.perf_counter()
        report = annotate_paths([inputs], name, tmp_path / f"out{workers}", workers=workers)
        assert len(report.written) == count
        rates[workers] = count / (time.perf_counter() - start)
    line = (f"{name} folder of {count}: 1 worker {rates[1]:.2f}/s, 2 workers {rates[2]:.2f}/s, "
            f"speed-up {rates[2] / rates[1]:.2f}x")
    print(line)
    # HED's one worker already spreads each image's convolutions over both cores (torch intra-op threads), so a
    # second process has no idle core to use; the target applies to the single-threaded preprocessors.
    if name in SCALING_TARGETS:
        assert rates[2] / rates[1] >= SCALING_TARGETS[name], line
