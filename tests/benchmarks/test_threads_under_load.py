"""Generation time under a competing CPU load: torch's default threads against `controlkit.devices.cpu_threads`.

Run: `pytest -m benchmark -s tests/benchmarks/test_threads_under_load.py` (about a minute on 2 cores). A fixed
small generation (the demo base and its canny ControlNet, 64 x 64, 20 steps) runs in a fresh process, first on an
idle machine and then while CPU-burning processes (`BURNERS_PER_CORE` per core, like the load of 9 on 2 cores
that made `controlkit demo` take 244 s instead of 13 s) hold every core. Each process times its generation only
(loading excluded), by the wall clock: under load the wall clock is what the user waits.

Printed: seconds per setting and condition, and the ratio default / chosen under load (target >= 1: the chosen
setting never collapses). The only assertion is that the chosen setting is not much slower than torch's default
on the idle machine, where both should use every core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BURNERS_PER_CORE = 4
#: The generation each process runs; it prints {"threads": N, "seconds": S}.
GENERATION = """
import json, sys, time
import numpy as np
from controlkit.control import Control
from controlkit.devices import use_cpu_threads
from controlkit.pipeline import generate, load_base, quiet_loading
import torch
if sys.argv[1] == "chosen":
    use_cpu_threads()
quiet_loading()
base = load_base("demo")
edges = np.zeros((64, 64, 3), np.uint8)
edges[16:48, 20] = 255
control = Control.from_pretrained("demo:canny", edges, unet=base.unet)
generate(base, "a red sphere", [control], steps=2, seed=0)  # warm-up
started = time.perf_counter()
generate(base, "a red sphere on a grey floor", [control], steps=20, seed=0)
print(json.dumps({"threads": torch.get_num_threads(), "seconds": time.perf_counter() - started}))
"""


def timed_generation(setting: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    completed = subprocess.run([sys.executable, "-c", GENERATION, setting], capture_output=True, text=True,
                               cwd=ROOT, env=env, timeout=1800)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def start_burners(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop(burners: list[subprocess.Popen]) -> None:
    for burner in burners:  # only the processes this test started, by their own handles
        burner.kill()
        burner.wait()


def test_chosen_threads_degrade_gracefully_under_load():
    cores = len(os.sched_getaffinity(0))
    results = {}
    for setting in ("default", "chosen"):
        results[(setting, "idle")] = timed_generation(setting)
    burners = start_burners(BURNERS_PER_CORE * cores)
    try:
        time.sleep(1.0)  # let the burners occupy the cores before the chosen setting looks at them
        for setting in ("default", "chosen"):
            results[(setting, "loaded")] = timed_generation(setting)
    finally:
        stop(burners)
    print(f"\n{cores} cores, {BURNERS_PER_CORE * cores} competing processes under load")
    for (setting, condition), result in results.items():
        print(f"  {setting:8s} {condition:7s} threads {result['threads']}: {result['seconds']:.2f} s")
    ratio = results[("default", "loaded")]["seconds"] / results[("chosen", "loaded")]["seconds"]
    print(f"  under load, default / chosen: {ratio:.2f}x")
    idle_ratio = results[("chosen", "idle")]["seconds"] / results[("default", "idle")]["seconds"]
    print(f"  idle, chosen / default: {idle_ratio:.2f}x")
    if results[("chosen", "idle")]["threads"] == results[("default", "idle")]["threads"]:
        assert idle_ratio < 1.5, "the same thread count on an idle machine should take about the same time"
