"""Training throughput and peak memory with the encoding cache on and off.

Run: `make benchmark` (or `pytest -m benchmark -s tests/benchmarks/test_training_speed.py`). The SD1.5-size CPU
case (random weights at the real sizes: U-Net 860 M, VAE 84 M, CLIP ViT-L text encoder 123 M; 512 x 512, batch 1,
two steps) takes several minutes and about 15 GB, so it runs only with CONTROLKIT_BENCH_SD15=1. The GPU case
(SD1.5 size, fp16 frozen parts, batch 4) skips without CUDA.

"off" (`data.cache_encodings=false`) does exactly the per-step work of diffusers' `train_controlnet.py`: the VAE
encodes every batch and the text encoder every caption. "on" reads both from the cache written before training.
Everything else is equal (same data, seed, batch, optimizer, channels-last). Each mode runs in its own process:

- samples/s from the median time of the steps after the first (warm-up): on CPU this process's CPU time with
  torch on one thread (on a machine shared with other jobs, wall time mostly measures their load), on GPU wall
  time after a CUDA synchronise;
- peak memory during those steps: the resident-set high-water mark, reset after the first step (Linux
  /proc/self/clear_refs), or CUDA's peak allocation;
- setup: seconds to load the models and, with the cache on, to fill it (paid once per dataset, not per epoch).

Target: on >= 1.5 x the samples/s of off, peak memory no higher.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]

#: name -> (model size, resolution, batch, pairs, timed steps after the warm-up step, device)
CASES = {
    "tiny-cpu": ("tiny", 64, 8, 32, 24, "cpu"),
    "sd15-cpu": ("sd15", 512, 1, 2, 1, "cpu"),
    "sd15-gpu": ("sd15", 512, 4, 32, 10, "cuda"),
}
#: Allowance for measurement noise in "peak memory no higher".
MEMORY_NOISE = 1.02


def _skip_reason(name: str) -> str | None:
    import torch

    if name == "sd15-cpu" and os.environ.get("CONTROLKIT_BENCH_SD15") != "1":
        return "SD1.5-size CPU training takes minutes and ~15 GB; set CONTROLKIT_BENCH_SD15=1"
    if CASES[name][5] == "cuda" and not torch.cuda.is_available():
        return "needs CUDA"
    return None


@pytest.mark.benchmark
@pytest.mark.parametrize("name", list(CASES))
def test_encoding_cache_speeds_up_training(name, tmp_path):
    reason = _skip_reason(name)
    if reason:
        pytest.skip(reason)
    size, resolution, batch, pairs, steps, device = CASES[name]
    base, data = _world(tmp_path, size, resolution, pairs)
    results = {mode: _measure(base, data, tmp_path / mode, mode, resolution, batch, steps, device)
               for mode in ("off", "on")}
    off, on = results["off"], results["on"]
    speedup = on["samples_per_second"] / off["samples_per_second"]
    print(f"\n{name}: resolution {resolution}, batch {batch}, {steps} timed steps, device {on['device']}")
    for mode, result in results.items():
        rate = result["samples_per_second"]
        print(f"  cache {mode:3s}: {rate:9.4g} samples/s ({batch / rate:7.3g} s per step)  peak "
              f"{result['peak_gib']:6.2f} GiB  setup {result['setup_s']:6.1f} s")
    print(f"  speed-up {speedup:.2f}x (target >= 1.5x); peak memory on/off {on['peak_gib'] / off['peak_gib']:.3f}"
          " (target <= 1)")
    assert speedup >= 1.5
    assert on["peak_gib"] <= off["peak_gib"] * MEMORY_NOISE


def _world(root: Path, size: str, resolution: int, pairs: int) -> tuple[Path, Path]:
    from controlkit.demo.toyworld.dataset import write_dataset
    from controlkit.tiny import TinyConfig, build_components, save_components

    components = build_components(TinyConfig(vae_channels=(32, 64, 64, 64)), seed=0) if size == "tiny" else _sd15()
    base = save_components(components, root / "base")
    return base, write_dataset(root / "pairs", pairs, kind="circles", condition="outline", size=resolution)


def _sd15() -> dict:
    """Stable Diffusion 1.5's architecture (configs as released) with random weights; a word-level tokenizer."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from controlkit.tiny import build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the other defaults are SD1.x's
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu",
    ))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": build_tokenizer(),
            "scheduler": scheduler}


def _measure(base: Path, data: Path, output: Path, mode: str, resolution: int, batch: int, steps: int,
             device: str) -> dict:
    """One mode in its own process (peak memory is per process)."""
    overrides = [
        f"model.base={base}", "model.condition=canny", f"data.source={data}", f"data.resolution={resolution}",
        f"train.output_dir={output}", f"train.batch_size={batch}", f"train.max_steps={steps + 1}",
        "checkpoint.every_steps=0", "logging.report_to=none", "logging.progress_bar=false",
        f"data.cache_encodings={'true' if mode == 'on' else 'false'}",
        *(["train.mixed_precision=fp16"] if device == "cuda" else []),
    ]
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    completed = subprocess.run([sys.executable, str(HERE), *overrides], capture_output=True, text=True,
                               env=environment, timeout=3600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _worker(overrides: list[str]) -> None:
    """Train and print {samples_per_second, peak_gib, setup_s, device} as the last line of stdout."""
    import torch

    from training.config import load_config
    from training.engine.loop import run_loop
    from training.engine.trainer import build_run

    torch.set_num_threads(1)
    config = load_config(None, overrides)
    started = time.perf_counter()
    run = build_run(config)
    setup = time.perf_counter() - started
    device = run.accelerator.device
    marks: dict[int, float] = {}

    def on_step(step: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks[step] = time.perf_counter() if device.type == "cuda" else time.process_time()
        if step == 1:
            _reset_peak(device)

    run.on_step = on_step
    run_loop(run)
    intervals = [marks[step] - marks[step - 1] for step in range(2, config.train.max_steps + 1)]
    print(json.dumps({
        "samples_per_second": run.layout.global_batch / statistics.median(intervals), "peak_gib": _peak(device),
        "setup_s": setup, "device": str(device),
    }))


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the resident-set high-water mark (VmHWM)


def _peak(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


if __name__ == "__main__":
    _worker(sys.argv[1:])
