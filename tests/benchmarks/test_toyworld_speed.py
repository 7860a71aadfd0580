"""Toy-world rendering throughput at 64 x 64 on this machine: scenes and figures per minute.

Run: `make benchmark` (or `pytest -m benchmark -s tests/benchmarks/test_toyworld_speed.py`). Prints the rates and
asserts nothing about time: there is no peer renderer to take a ratio against, and an absolute bound on a shared
machine fails on load, not on a slower renderer.
"""

from __future__ import annotations

import time

import pytest

from controlkit.demo.toyworld.world import render_figure, render_scene

pytestmark = pytest.mark.benchmark


def _per_minute(render, count: int) -> float:
    render(count)  # warm-up: imports, first-call caches; seed `count` is not among the timed ones
    start = time.perf_counter()
    for seed in range(count):
        render(seed)
    return count / (time.perf_counter() - start) * 60


def test_scenes_and_figures_per_minute():
    scenes, figures = _per_minute(render_scene, 200), _per_minute(render_figure, 50)
    print(f"toy world at 64x64: {scenes:.0f} scenes/min, {figures:.0f} figures/min")
