"""What each speed-up of `generate` buys and what it costs in control, measured in one run.

Run: `pytest -m benchmark -s tests/benchmarks/test_speed_options.py` (SD1.5 size too with CONTROLKIT_BENCH_SD15=1).

1. Per-step time (CPU thread time on one thread of a run of N steps less a run of 1 step, over N - 1: the prompt
   encoding and the rest outside the loop cancel; hooks on a compiled U-Net would recompile it, so steps are not
   timed from inside) against diffusers' `StableDiffusionControlNetPipeline` with the same
   components: both eager, and both compiled (diffusers as its docs recommend: `pipe.unet = torch.compile(...)` and
   the ControlNet likewise; inductor, default mode on CPU), ours in bfloat16, and ours with step reuse k=2.
2. The cost in control: the embedded demo's controllability table (the six conditions, the demo's held-out
   scenes and seeds, 4 images each) for each option next to the float32 default's, and the largest pixel
   difference from the default image over those images.

Targets on this CPU: compiled float32 <= 0.85 of diffusers eager and faster than diffusers compiled; bfloat16
<= 0.6 of diffusers float32 with every controllability figure within 5% of float32's; step reuse at k=2 <= 0.8 of
the default per-step time with controllability within 5%. Every figure is printed before the targets are checked.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Any, Callable

import numpy as np
import pytest
import torch
from test_generation_speed import CASES, PROMPT, setup

from controlkit.control import Control
from controlkit.pipeline import generate
from controlkit.sd_pipelines import pipeline_from_components

CONDITIONS = ("canny", "lineart", "softedge", "pose", "depth", "normal")
#: The options compared, as (generate options, control options, dtype).
OPTIONS: dict[str, tuple[dict[str, Any], dict[str, Any], torch.dtype]] = {
    "default": ({}, {}, torch.float32),
    "compiled": ({"compile": True}, {}, torch.float32),
    "bfloat16": ({}, {}, torch.bfloat16),
    "reuse k=2": ({}, {"every": 2}, torch.float32),
}
TOLERANCE = 0.05


def _in_dtype(components: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {name: copy.deepcopy(part).to(dtype) if isinstance(part, torch.nn.Module) else part
            for name, part in components.items()}


def runners(components: dict[str, Any], controlnet: Any, edges: np.ndarray) -> dict[str, Callable[[int], Any]]:
    """name -> run(steps)."""
    from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler
    from PIL import Image

    def diffusers_pipe(parts: dict[str, Any], net: Any) -> Any:
        scheduler = UniPCMultistepScheduler.from_config(parts["scheduler"].config)
        pipe = StableDiffusionControlNetPipeline(**{**parts, "scheduler": scheduler}, controlnet=net,
                                                 safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    eager = diffusers_pipe(components, controlnet)
    compiled = diffusers_pipe(components, controlnet)
    compiled.unet = torch.compile(compiled.unet)  # diffusers' recommendation (CPU: the default mode)
    compiled.controlnet = torch.compile(compiled.controlnet)
    base = pipeline_from_components(components)
    half_parts = _in_dtype(components, torch.bfloat16)
    half_base, half_net = pipeline_from_components(half_parts), copy.deepcopy(controlnet).to(torch.bfloat16)
    image, side = Image.fromarray(edges), edges.shape[0]

    def theirs(pipe: Any) -> Callable[[int], Any]:
        return lambda steps: pipe(PROMPT, image=image, generator=torch.Generator().manual_seed(0),
                                  num_inference_steps=steps, output_type="latent", height=side, width=side)

    def ours(on: Any, net: Any, **options: Any) -> Callable[[int], Any]:
        every = options.pop("every", 1)
        return lambda steps: generate(on, PROMPT, [Control(edges, net, every=every)], steps=steps, seed=0,
                                      output_type="latent", **options)

    return {
        "diffusers eager": theirs(eager),
        "diffusers compiled": theirs(compiled),
        "ours eager": ours(base, controlnet),
        "ours compiled": ours(base, controlnet, compile=True),
        "ours bfloat16": ours(half_base, half_net),
        "ours reuse k=2": ours(base, controlnet, every=2),
    }


def _seconds(run: Callable[[int], Any], steps: int) -> float:
    start = time.thread_time()
    run(steps)
    return time.thread_time() - start


def per_step_times(case_name: str) -> dict[str, float]:
    case = CASES[case_name]
    components, controlnet, edges = setup(case)
    runs = runners(components, controlnet, edges)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():  # warm-up: compilation (both U-Net graphs meet a step), allocator, imports
            run(2)
        for _ in range(case.repeats):
            for name, run in runs.items():  # interleaved: a burst of load hits every runner
                times[name].append((_seconds(run, case.steps) - _seconds(run, 1)) / (case.steps - 1))
    return {name: statistics.median(values) for name, values in times.items()}


def controllability_tables() -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Controllability per option and condition, and each option's largest pixel difference from the default."""
    from controlkit.demo.models import base_path
    from controlkit.demo.showcase import run_condition
    from controlkit.sd_pipelines import load_base

    tables: dict[str, dict[str, float]] = {}
    images: dict[str, list[np.ndarray]] = {}
    for option, (generate_options, control_options, dtype) in OPTIONS.items():
        base = load_base(base_path(), torch_dtype=dtype)
        tables[option], images[option] = {}, []
        for condition in CONDITIONS:
            run = run_condition(base, condition, 4, generate_options=generate_options,
                                control_options=control_options)
            tables[option][condition] = run.with_control.value
            tables.setdefault("control off", {})[condition] = run.without_control.value
            images[option] += [np.asarray(image, np.int16) for image in run.controlled]
    differences = {option: max(int(np.abs(a - b).max()) for a, b in zip(images[option], images["default"]))
                   for option in OPTIONS}
    return tables, differences


def _within(value: float, reference: float) -> bool:
    return abs(value - reference) <= TOLERANCE * max(abs(reference), 1e-9)


def report(case_name: str, times: dict[str, float], tables: dict[str, dict[str, float]],
           differences: dict[str, float]) -> dict[str, bool]:
    eager, compiled = times["diffusers eager"], times["diffusers compiled"]
    print(f"\n{case_name}: per-step time (ms), one CPU thread")
    for name, seconds in times.items():
        print(f"  {name:20s} {seconds * 1000:9.1f}   / diffusers eager {seconds / eager:.3f}")
    print("controllability (demo, 4 images a condition), and the largest pixel difference from the default (0-255)")
    print("  " + f"{'option':12s}" + "".join(f"{c:>10s}" for c in CONDITIONS) + f"{'max diff':>10s}")
    for option, row in tables.items():
        shown = "" if option == "control off" else f"{differences[option]:10d}"
        print("  " + f"{option:12s}" + "".join(f"{row[c]:10.3f}" for c in CONDITIONS) + shown)
    default = tables["default"]
    return {
        "compiled <= 0.85 diffusers eager": times["ours compiled"] <= 0.85 * eager,
        "compiled faster than diffusers compiled": times["ours compiled"] < compiled,
        "bfloat16 <= 0.6 diffusers float32": times["ours bfloat16"] <= 0.6 * eager,
        "reuse k=2 <= 0.8 default": times["ours reuse k=2"] <= 0.8 * times["ours eager"],
        **{f"{option} controllability within 5%": all(_within(tables[option][c], default[c]) for c in CONDITIONS)
           for option in ("compiled", "bfloat16", "reuse k=2")},
    }


@pytest.fixture()
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _check(case_name: str) -> None:
    times = per_step_times(case_name)
    tables, differences = controllability_tables()
    targets = report(case_name, times, tables, differences)
    for name, met in targets.items():
        print(f"  target {name}: {'met' if met else 'NOT met'}")
    assert all(targets.values()), targets


def test_speed_options_tiny(one_thread):
    _check("tiny-cpu")


@pytest.mark.skipif(os.environ.get("CONTROLKIT_BENCH_SD15") != "1", reason="minutes; set CONTROLKIT_BENCH_SD15=1")
def test_speed_options_sd15_size(one_thread):
    _check("sd15-cpu")
