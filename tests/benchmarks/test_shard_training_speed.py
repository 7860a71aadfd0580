"""Training samples/s reading WebDataset shards against reading the same pairs from a folder (a manifest).

Run: `pytest -m benchmark -s tests/benchmarks/test_shard_training_speed.py`. The tiny model at 64 px, batch 8,
one torch thread, encodings per step in both runs (a stream is encoded per step, so the folder run is too), the
data read in the training process (data.num_workers=0). samples/s from the wall time of the steps after the
first two, best of two alternated runs each. Target: shards >= 1.0x the folder.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_helpers import make_world, tiny_config  # noqa: E402

TINY_MODELS = True
STEPS, WARM_UP, BATCH = 26, 2, 8


def _samples_per_second(base, source, output) -> float:
    from training.engine.trainer import train

    times: list[float] = []
    settings = ("data.resolution=64", f"train.batch_size={BATCH}", f"train.max_steps={STEPS}",
                "data.cache_encodings=false", "data.num_workers=0")
    train(tiny_config(base, source, output, *settings), on_step=lambda step: times.append(time.perf_counter()))
    timed = times[WARM_UP:]
    return BATCH * (len(timed) - 1) / (timed[-1] - timed[0])


@pytest.mark.benchmark
def test_training_from_shards_keeps_up_with_a_folder(tmp_path):
    from training.data.dataset import load_pairs
    from training.data.shard_writer import pack_pairs

    base, manifest = make_world(tmp_path / "world", pairs=64)
    index = pack_pairs(load_pairs(manifest), tmp_path / "shards", shard_size=16)
    rates: dict[str, list[float]] = {"folder": [], "shards": []}
    for attempt in range(2):  # alternated, best of two: the first run of a process also warms its caches
        rates["folder"].append(_samples_per_second(base, manifest, tmp_path / f"folder-{attempt}"))
        rates["shards"].append(_samples_per_second(base, index, tmp_path / f"shards-{attempt}"))
    folder, shards = max(rates["folder"]), max(rates["shards"])
    line = f"training at 64 px, batch {BATCH}: folder {folder:.1f} samples/s, shards {shards:.1f} samples/s " \
           f"({shards / folder:.2f}x)"
    print(line)
    assert shards >= 1.0 * folder * 0.97, line  # 3%: the noise of two short runs on a shared CPU
