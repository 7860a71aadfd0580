"""The Ray engine of folder annotation on this machine: 2 actors against 1, and against the local engine.

Run: `pytest -m benchmark -s tests/benchmarks/test_ray_speed.py` (needs `pip install controlkit[ray]`). One local
Ray with two CPUs is started for the module (its start-up, paid once per command, is not timed; the actors'
start-up is). Same inputs as tests/benchmarks/test_annotate_speed.py: 512 x 512 PNGs in and out. Targets: Ray
with 2 workers >= 1.7x Ray with 1 (canny, pose), and within 10% of the local engine with 2 workers.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

from controlkit.demo.photos import sample_photo
from preprocessors import PREPROCESSORS
from preprocessors.batch import annotate_paths

ray = pytest.importorskip("ray", reason="pip install controlkit[ray]")
COUNTS = {"canny": 1200, "pose": 240}  # enough that the actors' start-up is amortised
SCALING, VERSUS_LOCAL = 1.7, 0.9


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def _rate(inputs, name, output, count, **engine) -> tuple[float, float]:
    """(images/s over the whole command, images/s after the first 5% of the maps: without the start-up)."""
    stamps: list[float] = []

    def progress(results, total):
        for result in results:
            stamps.append(time.perf_counter())
            yield result

    start = time.perf_counter()
    report = annotate_paths([inputs], name, output, progress=progress, **engine)
    assert len(report.written) == count and not report.failed
    skip = count // 20
    return count / (time.perf_counter() - start), (count - skip - 1) / (stamps[-1] - stamps[skip])


@pytest.mark.benchmark
@pytest.mark.parametrize("name", list(COUNTS))
def test_ray_engine_scales_and_keeps_up_with_the_local_engine(cluster, name, tmp_path):
    if PREPROCESSORS[name].check_ready() is not None:
        pytest.skip(f"{name}: {PREPROCESSORS[name].check_ready()}")
    photo, count = sample_photo("astronaut"), COUNTS[name]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for index in range(count):
        Image.fromarray(np.roll(photo, index * 7, axis=1)).save(inputs / f"in_{index:04d}.png")
    rates = {
        "ray 1": _rate(inputs, name, tmp_path / "ray1", count, workers=1, engine="ray"),
        "ray 2": _rate(inputs, name, tmp_path / "ray2", count, workers=2, engine="ray"),
        "local 2": _rate(inputs, name, tmp_path / "local2", count, workers=2),
    }
    steady = {key: value[1] for key, value in rates.items()}
    rates = {key: value[0] for key, value in rates.items()}
    line = (f"{name} folder of {count}: Ray 1 worker {rates['ray 1']:.2f}/s, Ray 2 workers {rates['ray 2']:.2f}/s "
            f"({rates['ray 2'] / rates['ray 1']:.2f}x), local 2 workers {rates['local 2']:.2f}/s (Ray / local "
            f"{rates['ray 2'] / rates['local 2']:.2f}); after start-up: Ray 1 {steady['ray 1']:.2f}/s, Ray 2 "
            f"{steady['ray 2']:.2f}/s ({steady['ray 2'] / steady['ray 1']:.2f}x), local 2 {steady['local 2']:.2f}/s "
            f"(Ray / local {steady['ray 2'] / steady['local 2']:.2f}); load average {os.getloadavg()[0]:.1f}")
    print(line)
    assert rates["ray 2"] / rates["ray 1"] >= SCALING, line
    assert rates["ray 2"] >= VERSUS_LOCAL * rates["local 2"], line
