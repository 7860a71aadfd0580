"""GPU speed in one command: it/s of controlkit and of diffusers' ControlNet pipelines, eager and compiled, fp16.

Run on a CUDA machine: `python tests/benchmarks/gpu_speed.py` (add `--sdxl` for SDXL at 1024x1024 too; about
5 minutes with it, most of it compilation). Cases: an SD1.5-size U-Net and ControlNet at 512x512 and an SDXL-size
pair at 1024x1024, random weights (speed does not depend on them), batch 1, guidance on, UniPC, 20 steps.
Per-step time is the wall time of a 20-step run less a 1-step run, over 19, after a CUDA synchronise, median of 3.
Compiled: ours with `generate(..., compile=True)` (CUDA graphs); diffusers as its docs recommend
(`torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)`, the ControlNet likewise). Also printed: ours
in bfloat16 and with step reuse k=2. Target: >= 60 it/s compiled with one ControlNet on an H100-class GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_generation_speed import sd15_size_components, sdxl_size_components  # noqa: E402

from controlkit.base_families import SD, SDXL, BaseFamily  # noqa: E402
from controlkit.control import Control  # noqa: E402
from controlkit.controlnet import build_controlnet  # noqa: E402
from controlkit.pipeline import generate  # noqa: E402
from controlkit.sd_pipelines import pipeline_from_components  # noqa: E402

PROMPT = "a red house by a lake, evening light"
STEPS, REPEATS = 20, 3


def _models(family: BaseFamily, dtype: torch.dtype) -> tuple[dict[str, Any], Any]:
    components = sdxl_size_components() if family is SDXL else sd15_size_components()
    controlnet = build_controlnet(components["unet"])
    for name, part in components.items():
        if isinstance(part, torch.nn.Module):
            part.to("cuda", dtype).eval()
    return components, controlnet.to("cuda", dtype).eval()


def _runners(family: BaseFamily, components: dict[str, Any], controlnet: Any, side: int) -> dict[str, Callable]:
    import diffusers
    from PIL import Image

    edges = np.zeros((side, side, 3), np.uint8)
    edges[side // 4 : 3 * side // 4, side // 3] = 255
    image = Image.fromarray(edges)
    cls = getattr(diffusers, "StableDiffusionXLControlNetPipeline" if family is SDXL else
                  "StableDiffusionControlNetPipeline")
    scheduler = diffusers.UniPCMultistepScheduler.from_config(components["scheduler"].config)
    eager = cls(**{**components, "scheduler": scheduler}, controlnet=controlnet, **family.options)
    compiled = cls(**{**components, "scheduler": scheduler}, controlnet=controlnet, **family.options)
    compiled.unet = torch.compile(compiled.unet, mode="reduce-overhead", fullgraph=True)
    compiled.controlnet = torch.compile(compiled.controlnet, mode="reduce-overhead", fullgraph=True)
    for pipe in (eager, compiled):
        pipe.set_progress_bar_config(disable=True)
    base = pipeline_from_components(components)

    def theirs(pipe: Any) -> Callable[[int], Any]:
        return lambda steps: pipe(PROMPT, image=image, num_inference_steps=steps, output_type="latent",
                                  height=side, width=side, generator=torch.Generator().manual_seed(0))

    def ours(**options: Any) -> Callable[[int], Any]:
        every = options.pop("every", 1)
        return lambda steps: generate(base, PROMPT, [Control(edges, controlnet, every=every)], steps=steps, seed=0,
                                      output_type="latent", **options)

    return {"diffusers eager": theirs(eager), "diffusers compiled": theirs(compiled), "ours eager": ours(),
            "ours compiled": ours(compile=True), "ours reuse k=2": ours(every=2),
            "ours compiled + reuse k=2": ours(compile=True, every=2)}


def _seconds(run: Callable[[int], Any], steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    run(steps)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(family: BaseFamily, side: int) -> dict[str, float]:
    components, controlnet = _models(family, torch.float16)
    runs = _runners(family, components, controlnet, side)
    steps_per_second: dict[str, float] = {}
    with torch.no_grad():
        for name, run in runs.items():
            run(3)  # compilation and CUDA graph capture happen here
            per_step = [(_seconds(run, STEPS) - _seconds(run, 1)) / (STEPS - 1) for _ in range(REPEATS)]
            steps_per_second[name] = 1.0 / statistics.median(per_step)
    return steps_per_second


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdxl", action="store_true", help="also SDXL at 1024x1024")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16, batch 1, guidance on, {STEPS} steps")
    cases = [(SD, 512)] + ([(SDXL, 1024)] if args.sdxl else [])
    for family, side in cases:
        rates = measure(family, side)
        print(f"\n{family.name} size, {side}x{side}, one ControlNet")
        for name, rate in rates.items():
            print(f"  {name:28s} {rate:7.2f} it/s   x{rate / rates['diffusers eager']:.2f} diffusers eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
