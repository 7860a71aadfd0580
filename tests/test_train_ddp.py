"""Two processes (DDP over gloo, started with torchrun) end with the same weights as one process over the same
global batch: the sampler gives every sample the same position, noise and timestep however the batch is split."""

from __future__ import annotations

from pathlib import Path

import torch
from train_helpers import load_tensors, make_world, overrides, train_in_two_processes

from controlkit.cli import main

TINY_MODELS = True  # one torch thread for this module (tests/conftest.py)

SETTINGS = ("train.max_steps=4", "optim.learning_rate=1e-3", "data.proportion_empty_prompts=0.3")


def _weights(output: Path) -> dict[str, torch.Tensor]:
    return load_tensors(output / "controlnet" / "diffusion_pytorch_model.safetensors")


def test_two_processes_match_one_process_over_the_same_global_batch(tmp_path):
    base, data = make_world(tmp_path)
    config = tmp_path / "empty.toml"
    config.write_text("")
    two = train_in_two_processes(config, overrides(base, data, tmp_path / "two", *SETTINGS, "train.batch_size=2"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trained 4 steps") == 1  # only the first process reports
    checkpoint = tmp_path / "two" / "checkpoints" / "checkpoint-00000004"
    assert (checkpoint / "rng-0.json").is_file() and (checkpoint / "rng-1.json").is_file()

    for name, batch in (("one", 4), ("other", 2)):
        arguments = overrides(base, data, tmp_path / name, *SETTINGS, f"train.batch_size={batch}")
        assert main(["train", str(config), *arguments]) == 0

    one, two_processes, other = _weights(tmp_path / "one"), _weights(tmp_path / "two"), _weights(tmp_path / "other")
    # Distance of the 2-process run from the 1-process run, relative to the distance of a run over other global
    # batches (same data, steps and seed): float summation order only (measured about 1e-4) versus training noise.
    ratio = float((_flat(two_processes) - _flat(one)).norm() / (_flat(other) - _flat(one)).norm())
    assert ratio < 1e-2, ratio


def _flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([weights[name].flatten().double() for name in sorted(weights)])
