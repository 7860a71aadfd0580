"""Checkpoint lineage: a rewound run keeps what it writes, `latest` follows the run the user continued, and
rotation keeps the checkpoint just written and the one a rewound run resumed from."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from train_helpers import load_tensors, make_world, tiny_config

from training.engine import checkpoints as checkpointing
from training.engine.trainer import train

TINY_MODELS = True  # one torch thread for this module (tests/conftest.py)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def _names(output: Path) -> list[str]:
    """Checkpoint folder names, oldest first by write order."""
    return [path.name for _, path in checkpointing.list_checkpoints(output / "checkpoints")]


def _lineage(path: Path) -> dict:
    return json.loads((path / checkpointing.MANIFEST).read_text())["lineage"]


def _stop_after(step: int):
    def on_step(done: int) -> None:
        if done == step:
            signal.raise_signal(signal.SIGTERM)  # a crash or preemption right after this step's checkpoint

    return on_step


def test_a_rewound_run_keeps_its_checkpoints_and_latest_continues_it(world, tmp_path):
    base, data = world
    output = tmp_path / "run"
    settings = ("train.max_steps=8", "checkpoint.every_steps=2", "checkpoint.total_limit=0")
    train(tiny_config(base, data, output, *settings))
    assert _names(output) == [f"checkpoint-0000000{step}" for step in (2, 4, 6, 8)]
    rewind = output / "checkpoints" / "checkpoint-00000002"

    # Rewind to step 2 with total_limit=3 and checkpoints every step; stopped right after the save of step 3.
    rewound = train(tiny_config(base, data, output, "train.max_steps=8", "checkpoint.every_steps=1",
                                "checkpoint.total_limit=3", f"checkpoint.resume={rewind}"), on_step=_stop_after(3))
    assert rewound.stopped_by == signal.SIGTERM and rewound.step == 3
    assert rewound.checkpoint.name == "checkpoint-00000003-branch1" and rewound.checkpoint.is_dir()
    # The oldest by write order went; the new checkpoint and the one resumed from stay.
    assert _names(output) == ["checkpoint-00000002", "checkpoint-00000008", "checkpoint-00000003-branch1"]
    assert _lineage(rewound.checkpoint) == {"sequence": 5, "branch": 1, "parent": "checkpoint-00000002"}

    assert checkpointing.resolve_resume(output / "checkpoints", "latest") == rewound.checkpoint
    continued = train(tiny_config(base, data, output, "train.max_steps=5", "checkpoint.every_steps=1",
                                  "checkpoint.total_limit=3", "checkpoint.resume=latest"))
    assert continued.step == 5 and len(continued.losses) == 2  # from step 3, not the abandoned step 8
    assert continued.checkpoint.name == "checkpoint-00000005-branch1"
    assert _lineage(continued.checkpoint)["parent"] == "checkpoint-00000004-branch1"
    # Continuing the newest checkpoint is an uninterrupted run: plain rotation, oldest first.
    assert _names(output) == ["checkpoint-00000003-branch1", "checkpoint-00000004-branch1",
                              "checkpoint-00000005-branch1"]


def test_the_rewound_branch_trains_what_a_straight_run_trains(world, tmp_path):
    base, data = world
    straight = train(tiny_config(base, data, tmp_path / "straight", "train.max_steps=4"))
    output = tmp_path / "run"
    train(tiny_config(base, data, output, "train.max_steps=4", "checkpoint.every_steps=2"))
    rewound = train(tiny_config(base, data, output, "train.max_steps=4", "checkpoint.every_steps=2",
                                f"checkpoint.resume={output / 'checkpoints' / 'checkpoint-00000002'}"))
    assert rewound.checkpoint.name == "checkpoint-00000004-branch1"
    assert (output / "checkpoints" / "checkpoint-00000004").is_dir()  # the abandoned branch's is not replaced
    assert rewound.losses == straight.losses[2:]
    expected = load_tensors(tmp_path / "straight" / "controlnet" / "diffusion_pytorch_model.safetensors")
    actual = load_tensors(output / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def _fake_checkpoint(root: Path, name: str, lineage: dict | None) -> Path:
    """A complete checkpoint folder as far as the listing is concerned (a manifest of no files)."""
    folder = root / name
    folder.mkdir(parents=True)
    manifest = {"files": {}} if lineage is None else {"files": {}, "lineage": lineage}
    (folder / checkpointing.MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_write_order_rotation_and_branches_without_training(tmp_path):
    root = tmp_path / "checkpoints"
    legacy = [_fake_checkpoint(root, f"checkpoint-0000000{step}", None) for step in (2, 4)]  # before lineage
    newer = _fake_checkpoint(root, "checkpoint-00000003-branch1",
                             {"sequence": 1, "branch": 1, "parent": "checkpoint-00000002"})
    _fake_checkpoint(root, "checkpoint-00000009", {"sequence": "?", "branch": None})  # unreadable lineage
    (root / "checkpoint-00000010").mkdir()  # no manifest: not a checkpoint
    found = checkpointing.scan_checkpoints(root)
    assert [entry.path.name for entry in found] == [
        "checkpoint-00000002", "checkpoint-00000004", "checkpoint-00000009", "checkpoint-00000003-branch1"]
    assert checkpointing.resolve_resume(root, "latest") == newer

    assert checkpointing.continue_lineage(root, newer) == checkpointing.Lineage(1, newer.name)
    rewind = checkpointing.continue_lineage(root, legacy[0])  # a legacy checkpoint with a later one after it
    assert rewind == checkpointing.Lineage(branch=2, parent=legacy[0].name, protected=legacy[0])
    elsewhere = checkpointing.continue_lineage(root, tmp_path / "other" / "checkpoint-00000001")
    assert (elsewhere.branch, elsewhere.protected) == (2, None)

    removed = checkpointing.rotate(root, 1, keep=(newer, legacy[0]))
    assert [path.name for path in removed] == ["checkpoint-00000004", "checkpoint-00000009"]
    assert [entry.path for entry in checkpointing.scan_checkpoints(root)] == [legacy[0], newer]
