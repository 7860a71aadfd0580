"""Shared setup of the trainer tests: a tiny real base model folder and a small paired dataset, offline."""

from __future__ import annotations

from pathlib import Path

#: Sizes that make a training step take milliseconds on a CPU: 16 px images, x2 VAE -> 8 x 8 latents.
RESOLUTION = 16


def make_world(root: Path, pairs: int = 16) -> tuple[Path, Path]:
    """(base model folder, dataset manifest) under `root`: controlkit.tiny components and toy-world circles."""
    from controlkit.demo.toyworld.dataset import write_dataset
    from controlkit.tiny import TinyConfig, build_components, save_components

    tiny = TinyConfig(block_out_channels=(16, 32), vae_channels=(16, 32), cross_attention_dim=32, sample_size=8)
    base = save_components(build_components(tiny, seed=0), root / "base")
    manifest = write_dataset(root / "circles", pairs, kind="circles", condition="outline", size=32)
    return base, manifest


def overrides(base: Path, data: Path, output: Path, *extra: str) -> list[str]:
    """Config overrides for a quiet, fast tiny run (extra ones last, so they win)."""
    return [
        f"model.base={base}", "model.condition=canny", f"data.source={data}", f"data.resolution={RESOLUTION}",
        f"train.output_dir={output}", "train.batch_size=2", "train.max_steps=4", "optim.learning_rate=1e-3",
        "checkpoint.every_steps=0", "logging.report_to=none", "logging.progress_bar=false", "logging.every_steps=1000",
        *extra,
    ]


def tiny_config(base: Path, data: Path, output: Path, *extra: str):
    from training.config import load_config

    return load_config(None, overrides(base, data, output, *extra))


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))



def make_sdxl_world(root: Path, pairs: int = 16) -> tuple[Path, Path]:
    """(tiny SDXL base folder, dataset manifest) under `root`: controlkit.tiny's SDXL components, and toy-world
    circles of which every other pair is cut to 24 x 32 (height x width), so that the samples' original sizes and
    crops (SDXL's size/crop conditioning) differ."""
    import json

    import numpy as np
    from PIL import Image

    from controlkit.demo.toyworld.dataset import write_dataset
    from controlkit.tiny import TINY_SDXL_CONFIG, build_components, save_components

    base = save_components(build_components(TINY_SDXL_CONFIG, seed=0), root / "sdxl-base")
    source = write_dataset(root / "circles", pairs, kind="circles", condition="outline", size=32)
    folder = root / "sdxl-pairs"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, line in enumerate(source.read_text().splitlines()):
        record = json.loads(line)
        for role in ("image", "condition"):
            pixels = np.asarray(Image.open(source.parent / record[role]).convert("RGB"))
            name = f"{index:04d}-{role}.png"
            Image.fromarray(pixels[:24] if index % 2 else pixels).save(folder / name)
            record[role] = name
        lines.append(json.dumps({key: record[key] for key in ("image", "condition", "prompt")}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return base, manifest


def train_in_two_processes(config: Path, arguments: list[str]):
    """`controlkit train CONFIG ARGUMENTS` in two real processes (torch.distributed.run, one thread each, offline);
    the finished `subprocess.CompletedProcess` (stdout and stderr captured)."""
    import os
    import subprocess
    import sys

    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                       PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "controlkit", "train", str(config)]
    return subprocess.run([*launch, *arguments], capture_output=True, text=True, env=environment, timeout=300)
