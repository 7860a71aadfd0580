"""What a run writes: outputs it could not write are refused before training, a failed final export leaves no
half-written model and says how to export again, weights an update made non-finite are never saved."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from train_helpers import load_tensors, make_world, overrides, tiny_config

from controlkit.cli import main
from controlkit.errors import ConfigError, OutputError
from training.engine import checkpoints as checkpointing
from training.engine.run import LoopState, TrainingDiverged, save_checkpoint
from training.engine.trainer import build_run, train

TINY_MODELS = True  # one torch thread for this module (tests/conftest.py)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.mark.parametrize("blocker, extra, error", [
    ("controlnet", (), r"run/controlnet is a file, but the run writes its folder there"),
    ("run.safetensors/", ("checkpoint.save_original=true",), r"run\.safetensors is a folder, but the run writes its file"),
    ("logs", ("logging.report_to=tensorboard",), r"run/logs is a file"),
])
def test_outputs_the_run_could_not_write_are_refused_before_training(world, tmp_path, blocker, extra, error):
    base, data = world
    output = tmp_path / "run"
    output.mkdir()
    if blocker.endswith("/"):
        (output / blocker).mkdir()
    else:
        (output / blocker).write_text("in the way")
    with pytest.raises(ConfigError, match=error):
        train(tiny_config(base, data, output, *extra))
    assert not (output / "checkpoints").exists()  # nothing ran


def test_unwritable_cache_folders_are_refused_before_training(world, tmp_path):
    base, data = world
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"`data.cache_dir` .*file/cache: cannot write there"):
        train(tiny_config(base, data, tmp_path / "run", f"data.cache_dir={tmp_path / 'file' / 'cache'}"))
    with pytest.raises(OutputError, match=r"`data.condition_cache_dir` .*file: is a file"):
        train(tiny_config(base, data, tmp_path / "run", f"data.condition_cache_dir={tmp_path / 'file'}"))


_FULL_DISK = """
import resource, signal, sys
from controlkit.cli import main

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk: every write past 64 KiB fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_a_failed_export_leaves_no_model_folder_and_the_same_command_exports_again(world, tmp_path):
    base, data = world
    output = tmp_path / "run"
    arguments = overrides(base, data, output, "train.max_steps=2")
    assert main(["train", str(_empty_config(tmp_path)), *arguments]) == 0
    model = output / "controlnet" / "diffusion_pytorch_model.safetensors"
    trained = load_tensors(model)
    for path in (output / "controlnet").iterdir():
        path.unlink()
    (output / "controlnet").rmdir()

    # The export alone (resuming the final checkpoint trains no step) on a disk that is full.
    script = tmp_path / "full_disk.py"
    script.write_text(textwrap.dedent(_FULL_DISK))
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                       PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [sys.executable, str(script), str(_empty_config(tmp_path)), *arguments, "checkpoint.resume=latest"]
    process = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300,
                             check=False)
    assert process.returncode == 1, process.stderr
    last_line = process.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: writing the final model in {output} failed (")
    assert "File too large" in last_line and "no partial model was left" in last_line
    assert "checkpoint-00000002: free space" in last_line and "checkpoint.resume=latest" in last_line
    assert not (output / "controlnet").exists()
    assert not [path.name for path in output.iterdir() if path.name.startswith(".ck-")]

    assert main(["train", str(_empty_config(tmp_path)), *arguments, "checkpoint.resume=latest"]) == 0
    exported = load_tensors(model)
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)


def _empty_config(tmp_path: Path) -> Path:
    config = tmp_path / "empty.toml"
    config.write_text("")
    return config


def test_weights_an_update_made_non_finite_are_never_saved(world, tmp_path):
    base, data = world
    run = build_run(tiny_config(base, data, tmp_path / "run", "checkpoint.every_steps=1"))
    parameter = run.parameters[0]
    with torch.no_grad():
        parameter[(0,) * parameter.dim()] = math.inf  # what one update with a learning rate far too high leaves
    with pytest.raises(TrainingDiverged, match=r"the trained weights are not finite after step 1 .*nothing was "
                                               r"saved; lower optim.learning_rate \(now 0.001\)"):
        save_checkpoint(run, LoopState(step=1))
    assert checkpointing.list_checkpoints(run.checkpoints) == []
    run.accelerator.end_training()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fp16 fallback is for machines without CUDA")
def test_fp16_on_a_machine_without_cuda_trains_in_float32_and_says_so(world, tmp_path, capsys):
    base, data = world
    result = train(tiny_config(base, data, tmp_path / "run", "train.mixed_precision=fp16", "train.max_steps=2"))
    assert result.step == 2 and all(math.isfinite(loss) for loss in result.losses)
    assert "note: train.mixed_precision = 'fp16' needs a CUDA GPU" in capsys.readouterr().err
    state = json.loads((result.checkpoint / "state.json").read_text())
    assert state["config"]["train.mixed_precision"] == "no"  # what the run did, so a resume on a GPU is a change


def test_a_missing_data_source_is_found_before_the_models_load(world, tmp_path):
    base, _ = world
    with pytest.raises(ConfigError, match=r"`data.source` .*nothing.jsonl: no such file or folder"):
        train(tiny_config(base, tmp_path / "nothing.jsonl", tmp_path / "run"))
    assert not (tmp_path / "run" / "logs").exists()
