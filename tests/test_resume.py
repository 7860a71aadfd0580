"""Checkpoints and resume: bitwise resume equivalence on CPU, a process killed mid-save, a full disk, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from train_helpers import load_tensors, make_world, overrides, tiny_config

from controlkit.errors import CheckpointError, ConfigError
from training.engine import checkpoints as checkpointing
from training.engine.trainer import train

TINY_MODELS = True  # one torch thread for this module (tests/conftest.py)

#: Everything a resume must restore is in play: EMA, a warm-up + cosine schedule (whose shape depends on
#: max_steps), gradient accumulation, prompt dropout, and epochs of 4 steps so the interruption is mid-epoch.
RESUME_SETTINGS = (
    "ema.enabled=true", "ema.decay=0.9", "schedule.name=cosine", "schedule.warmup_steps=2",
    "train.gradient_accumulation_steps=2", "data.proportion_empty_prompts=0.3", "train.max_steps=6",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def _final_state(output: Path) -> dict[str, torch.Tensor]:
    """The final ControlNet weights and the last checkpoint's optimizer and EMA tensors."""
    last = checkpointing.list_checkpoints(checkpointing.checkpoint_dir(output))[-1][1]
    final = load_tensors(output / "controlnet" / "diffusion_pytorch_model.safetensors")
    tensors = {f"model.{k}": v for k, v in final.items()}
    for name in ("optimizer", "ema", "trained"):
        tensors.update({f"{name}.{k}": v for k, v in load_tensors(last / f"{name}.safetensors").items()})
    return tensors


def _stop_at(step: int):
    def on_step(done: int) -> None:
        if done == step:
            signal.raise_signal(signal.SIGTERM)  # what a scheduler's preemption sends

    return on_step


def test_interrupted_and_resumed_run_ends_bitwise_equal_to_a_straight_run(world, tmp_path):
    base, data = world
    straight = train(tiny_config(base, data, tmp_path / "straight", *RESUME_SETTINGS))
    assert straight.step == 6 and not straight.stopped_by

    interrupted = train(tiny_config(base, data, tmp_path / "resumed", *RESUME_SETTINGS), on_step=_stop_at(3))
    assert interrupted.stopped_by == signal.SIGTERM and interrupted.step == 3 and interrupted.output is None
    assert interrupted.checkpoint.name == "checkpoint-00000003"
    resumed = train(tiny_config(base, data, tmp_path / "resumed", *RESUME_SETTINGS, "checkpoint.resume=latest"))
    assert resumed.step == 6 and len(resumed.losses) == 3
    assert resumed.losses == straight.losses[3:]  # the same batches, noise and learning rates after the resume

    expected, actual = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
    assert expected.keys() == actual.keys()
    different = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    last = checkpointing.list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1][1]
    state = json.loads((last / "state.json").read_text())
    assert state["data"] == {"epoch": 1, "step_in_epoch": 2, "steps_per_epoch": 4, "usable_pairs": 16, "seed": 0}


def test_resume_refuses_a_config_that_changes_the_run(world, tmp_path):
    base, data = world
    train(tiny_config(base, data, tmp_path / "run", "train.max_steps=2"))
    changed = tiny_config(base, data, tmp_path / "run", "train.max_steps=2", "checkpoint.resume=latest",
                          "optim.learning_rate=5e-4", "train.batch_size=4")
    with pytest.raises(CheckpointError, match=r"optim\.learning_rate: 0\.001 -> 0\.0005.*train\.batch_size: 2 -> 4"):
        train(changed)
    # Checkpointing and logging settings, and more steps on a constant schedule, do not change what is trained.
    extended = train(tiny_config(base, data, tmp_path / "run", "train.max_steps=3", "checkpoint.resume=latest",
                                 "checkpoint.total_limit=1"))
    assert extended.step == 3 and len(extended.losses) == 1
    assert [step for step, _ in checkpointing.list_checkpoints(tmp_path / "run" / "checkpoints")] == [3]


def test_resume_arguments_and_output_folder_are_checked(world, tmp_path):
    base, data = world
    with pytest.raises(CheckpointError, match="checkpoint.resume: .*missing-checkpoint is not a folder"):
        train(tiny_config(base, data, tmp_path / "a", f"checkpoint.resume={tmp_path / 'missing-checkpoint'}"))
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="`train.output_dir` .*file/run is not writable"):
        train(tiny_config(base, data, tmp_path / "file" / "run"))
    first = train(tiny_config(base, data, tmp_path / "b", "train.max_steps=1", "checkpoint.resume=latest"))
    assert first.step == 1  # 'latest' with nothing saved yet starts a fresh run
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run; continue it with checkpoint.resume"):
        train(tiny_config(base, data, tmp_path / "b", "train.max_steps=1"))


_SCRIPT = """
import os, resource, signal, sys, time
import training.engine.checkpoints as checkpointing
from controlkit.cli import main

mode, original = sys.argv[1], checkpointing._write_files

def write_files(accelerator, temp, objects, state):
    if state["step"] < 4:
        return original(accelerator, temp, objects, state)
    if mode == "kill":  # part of the checkpoint is on disk, the rest is not: wait here to be killed
        checkpointing.write_state(temp / "optimizer", objects.optimizer.state_dict())
        print("SAVING", flush=True)
        time.sleep(120)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk: writes fail with EFBIG from now on
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    return original(accelerator, temp, objects, state)

checkpointing._write_files = write_files

if mode == "term":  # the signal a scheduler sends to preempt a job, arriving during step 2
    from training.engine.diffusion import DiffusionRecipe

    step = DiffusionRecipe.step

    def optimizer_step(recipe, run, index, micro_batches, state):
        if index == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(recipe, run, index, micro_batches, state)

    DiffusionRecipe.step = optimizer_step
sys.exit(main(["train", *sys.argv[2:]]))
"""


def _launch(mode: str, arguments: list[str], tmp_path: Path) -> subprocess.Popen:
    script = tmp_path / "train_with_fault.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    config = tmp_path / "empty.toml"
    config.write_text("")
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                       PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen([sys.executable, str(script), mode, str(config), *arguments], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment)


def _assert_last_checkpoint_loads(world, output: Path) -> None:
    base, data = world
    found = checkpointing.list_checkpoints(output / "checkpoints")
    assert [step for step, _ in found] == [2]
    checkpointing.verify_checkpoint(found[0][1])
    resumed = train(tiny_config(base, data, output, "train.max_steps=3", "checkpoint.every_steps=2",
                                "checkpoint.resume=latest"))
    assert resumed.step == 3 and resumed.losses and all(loss == loss for loss in resumed.losses)
    assert not list((output / "checkpoints").glob("tmp-*"))  # the killed save's leftovers are cleaned up


def test_a_process_killed_during_a_save_leaves_the_last_checkpoint_loadable(world, tmp_path):
    base, data = world
    output = tmp_path / "run"
    process = _launch("kill", overrides(base, data, output, "train.max_steps=6", "checkpoint.every_steps=2"), tmp_path)
    try:
        line = process.stdout.readline()
        assert line.strip() == "SAVING", process.stderr.read()
        assert list((output / "checkpoints").glob("tmp-checkpoint-00000004"))
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    _assert_last_checkpoint_loads(world, output)


def test_a_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(world, tmp_path):
    base, data = world
    output = tmp_path / "run"
    process = _launch("disk", overrides(base, data, output, "train.max_steps=6", "checkpoint.every_steps=2"), tmp_path)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: writing the checkpoint of step 4 in")
    assert "File too large" in last_line and "the previous checkpoint" in last_line and "is intact" in last_line
    assert not list((output / "checkpoints").glob("tmp-*"))
    _assert_last_checkpoint_loads(world, output)


def test_sigterm_saves_a_checkpoint_and_exits_with_143(world, tmp_path):
    base, data = world
    output = tmp_path / "run"
    process = _launch("term", overrides(base, data, output, "train.max_steps=6"), tmp_path)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by signal 15 at step 2" in stdout and "checkpoint.resume=latest" in stdout
    assert [step for step, _ in checkpointing.list_checkpoints(output / "checkpoints")] == [2]
    assert not (output / "controlnet").exists()  # no final model from an interrupted run
