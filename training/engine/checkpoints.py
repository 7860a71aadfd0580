"""Atomic, resumable training checkpoints.

A checkpoint is a folder `OUTPUT/checkpoints/checkpoint-00000500/`:

    trained.safetensors          weights of the trained modules (ControlNet; U-Net decoder or U-Net; text encoder)
    optimizer.{json,safetensors} optimizer state            ema.{json,safetensors}  EMA state (when enabled)
    rng-<rank>.{json,...}        python, numpy, torch CPU/CUDA and the trainer's generator, per process
    state.json                   step, data position, LR scheduler, counters, the config and the world size
    complete.json                written last: every file with its size and sha256

It is written into `tmp-checkpoint-<step>` in the same folder, every file flushed and fsynced, then renamed into
place; only then are old checkpoints rotated out (`total_limit`). A folder without a valid `complete.json` is not
a checkpoint: `latest` skips it, and a kill at any moment leaves the previous checkpoint loadable. Sharded engines
(DeepSpeed, FSDP) write their model and optimizer shards through `accelerator.save_state` into `engine/`.

Lineage (which checkpoint descends from which, what `latest` and rotation pick): training/engine/lineage.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit.errors import CheckpointError
from training.engine.lineage import (
    MANIFEST,
    PREFIX,
    Checkpoint,
    Lineage,
    checkpoint_name,
    continue_lineage,
    read_manifest,
    rotate,
    scan_checkpoints,
)
from training.engine.statefile import fsync_dir, fsync_file, read_state, write_state

if TYPE_CHECKING:
    import torch

TEMP_PREFIX = "tmp-checkpoint-"
__all__ = [
    "FREE_KEYS", "MANIFEST", "PREFIX", "TEMP_PREFIX", "Checkpoint", "Lineage", "TrainingObjects", "capture_rng",
    "checkpoint_dir", "checkpoint_name", "config_drift", "continue_lineage", "like", "list_checkpoints",
    "load_checkpoint", "load_trained_state", "resolve_resume", "restore_rng", "rotate", "save_checkpoint",
    "scan_checkpoints", "trained_state", "verify_checkpoint",
]

#: Config keys that may change between a checkpoint and its resumption without changing what is trained.
FREE_KEYS = (
    "checkpoint.", "logging.", "validation.", "train.output_dir", "train.process_timeout_minutes",
    "data.num_workers", "data.cache_dir", "data.condition_cache_dir", "ema.use_for_output",
)


@dataclass
class TrainingObjects:
    """Everything a checkpoint saves and restores, by reference.

    Attributes:
        trained: name -> module whose trainable parameters are saved (unwrapped modules).
        optimizer, lr_scheduler: the optimizer and its schedule; ema: diffusers EMAModel or None.
        generator: the trainer's torch.Generator (noise, timesteps, prompt dropout).
    """

    trained: dict[str, "torch.nn.Module"]
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    generator: "torch.Generator"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first by write order (the last one is
    what `latest` resumes)."""
    return [(entry.step, entry.path) for entry in scan_checkpoints(root)]


def resolve_resume(root: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: None for a fresh run or for 'latest' with none saved yet ('latest' is the
    newest by write order, which after a rewind is the rewound run's newest, not the highest step).

    Raises:
        CheckpointError: an explicit folder that is missing or incomplete.
    """
    if not resume:
        return None
    if resume == "latest":
        found = scan_checkpoints(root)
        return found[-1].path if found else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume: {resume} is not a folder; pass a checkpoint folder or 'latest'")
    if not _is_complete(path):
        raise CheckpointError(f"checkpoint.resume: {resume} is not a complete checkpoint (no valid {MANIFEST})")
    return path


def save_checkpoint(
    accelerator: Any, root: str | Path, step: int, objects: TrainingObjects, state: dict[str, Any], *,
    total_limit: int = 0, lineage: Lineage | None = None,
) -> Path:
    """Write a checkpoint of `step` atomically (all processes call this), then rotate old ones out.

    Args:
        state: JSON-able run state (data position, counters, config, world size) for state.json.
        total_limit: checkpoints to keep (0: all); removal happens only after the new one is complete, takes the
            oldest by write order, and never the new one or `lineage.protected`.
        lineage: the run's branch and parent (default: the first branch); its parent becomes the new checkpoint.

    Raises:
        CheckpointError: the write failed (disk full, unwritable folder); the temporary folder is removed and
            earlier checkpoints are untouched.
    """
    root, lineage = Path(root), lineage if lineage is not None else Lineage()
    name = checkpoint_name(step, lineage.branch)
    temp, final = root / f"{TEMP_PREFIX}{name[len(PREFIX):]}", root / name
    error = None
    if accelerator.is_main_process:
        error = _attempt(lambda: _prepare_temp(root, temp))
    error = _agree(accelerator, error)
    if error is None:
        error = _agree(accelerator, _attempt(lambda: _write_files(accelerator, temp, objects, state)))
    if error is None and accelerator.is_main_process:
        error = _attempt(lambda: _commit(temp, final, lineage))
    error = _agree(accelerator, error)
    if error is not None:
        if accelerator.is_main_process:
            shutil.rmtree(temp, ignore_errors=True)
        kept = list_checkpoints(root)
        previous = f"; the previous checkpoint {kept[-1][1]} is intact" if kept else ""
        raise CheckpointError(f"writing the checkpoint of step {step} in {root} failed: {error}{previous}")
    lineage.parent = final.name
    if accelerator.is_main_process and total_limit:
        rotate(root, total_limit, keep=(final, lineage.protected))
    accelerator.wait_for_everyone()
    return final


def _attempt(action: Callable[[], None]) -> str | None:
    try:
        action()
    except Exception as error:  # any failure of a write (OSError, safetensors' error) means "not saved"
        return f"{type(error).__name__}: {error}"
    return None


def _agree(accelerator: Any, error: str | None) -> str | None:
    """Every process learns whether any process failed (a process that raised alone would hang the others)."""
    import torch

    if accelerator.num_processes == 1:
        return error
    failed = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    failed = accelerator.reduce(failed, reduction="sum")
    if error is None and failed.item() > 0:
        return "another process could not write its part"
    return error


def _prepare_temp(root: Path, temp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TEMP_PREFIX}*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    needed = _last_size(root)
    free = shutil.disk_usage(root).free
    if needed and free < needed:
        raise OSError(f"only {free / 2**20:.0f} MiB free, the last checkpoint took {needed / 2**20:.0f} MiB")
    temp.mkdir()


def _last_size(root: Path) -> int:
    found = list_checkpoints(root)
    if not found:
        return 0
    manifest = json.loads((found[-1][1] / MANIFEST).read_text())
    return sum(entry["size"] for entry in manifest["files"].values())


def _write_files(accelerator: Any, temp: Path, objects: TrainingObjects, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    accelerator.wait_for_everyone()  # the folder exists before anyone writes into it
    if _sharded(accelerator):  # collective: first, so that no process can leave before it
        accelerator.save_state(str(temp / "engine"), safe_serialization=True)
    write_state(temp / f"rng-{accelerator.process_index}", capture_rng(objects.generator))
    if not accelerator.is_main_process:
        return
    if not _sharded(accelerator):
        save_file(trained_state(objects.trained), str(temp / "trained.safetensors"))
        fsync_file(temp / "trained.safetensors")
        write_state(temp / "optimizer", objects.optimizer.state_dict())
    if objects.ema is not None:
        write_state(temp / "ema", objects.ema.state_dict())
    full_state = dict(state, lr_scheduler=objects.lr_scheduler.state_dict())
    write_state(temp / "state", full_state)


def _commit(temp: Path, final: Path, lineage: Lineage) -> None:
    files = {
        str(path.relative_to(temp)): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(temp.rglob("*")) if path.is_file()
    }
    sequence = max((entry.sequence for entry in scan_checkpoints(final.parent)), default=0) + 1
    record = {"sequence": sequence, "branch": lineage.branch, "parent": lineage.parent}
    (temp / MANIFEST).write_text(json.dumps({"files": files, "lineage": record}, indent=1))
    fsync_file(temp / MANIFEST)
    fsync_dir(temp)
    if final.exists():  # an earlier run's checkpoint of the same step: replaced only by a complete one
        shutil.rmtree(final)
    temp.replace(final)
    fsync_dir(final.parent)


def load_checkpoint(accelerator: Any, path: str | Path, objects: TrainingObjects) -> dict[str, Any]:
    """Restore everything `save_checkpoint` saved into `objects` (in place) and return the run state.

    Raises:
        CheckpointError: a file that is missing or does not match its recorded size and sha256.
    """
    from safetensors.torch import load_file

    path = Path(path)
    verify_checkpoint(path)
    if _sharded(accelerator):
        accelerator.load_state(str(path / "engine"))
    else:
        load_trained_state(objects.trained, load_file(str(path / "trained.safetensors")))
        objects.optimizer.load_state_dict(read_state(path / "optimizer"))
        _match_layouts(objects.optimizer)
    if objects.ema is not None:
        if not (path / "ema.json").exists():
            raise CheckpointError(f"{path} has no EMA state but ema.enabled is true; resume with ema.enabled=false")
        objects.ema.load_state_dict(read_state(path / "ema"))
        parameters = [p for module in objects.trained.values() for p in module.parameters() if p.requires_grad]
        objects.ema.shadow_params = [like(shadow, p) for shadow, p in zip(objects.ema.shadow_params, parameters)]
    state = read_state(path / "state")
    objects.lr_scheduler.load_state_dict(state.pop("lr_scheduler"))
    rng_file = path / f"rng-{accelerator.process_index}"
    if not rng_file.with_suffix(".json").exists():
        raise CheckpointError(f"{path} has no random state for process {accelerator.process_index}")
    restore_rng(read_state(rng_file), objects.generator)
    return state


def _match_layouts(optimizer: Any) -> None:
    """Give restored optimizer state the memory layout of its parameters (channels-last convolutions): a fresh
    state is created `zeros_like(param)`, and kernels round differently on differently strided tensors."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for name, value in state.items():
                if hasattr(value, "shape") and value.shape == parameter.shape:
                    state[name] = like(value, parameter)


def like(value: "torch.Tensor", parameter: "torch.Tensor") -> "torch.Tensor":
    """`value` with the strides of `parameter` (same shape), its own dtype."""
    import torch

    if value.stride() == parameter.stride():
        return value
    return torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def verify_checkpoint(path: Path) -> None:
    if not _is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (missing or bad {MANIFEST})")
    manifest = json.loads((path / MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        if _sha256(path / name) != entry["sha256"]:
            raise CheckpointError(f"{path / name} is corrupted (sha256 differs from {MANIFEST}); resume from another")


def _is_complete(path: Path) -> bool:
    return read_manifest(path) is not None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _sharded(accelerator: Any) -> bool:
    return accelerator.distributed_type.value in ("DEEPSPEED", "FSDP")


def trained_state(trained: dict[str, "torch.nn.Module"]) -> dict[str, "torch.Tensor"]:
    """{"<name>.<parameter>": tensor} of the trainable parameters (all buffers too, for wholly trained modules)."""
    state = {}
    for name, module in trained.items():
        trainable = {key for key, parameter in module.named_parameters() if parameter.requires_grad}
        whole = len(trainable) == len(list(module.parameters()))
        for key, tensor in module.state_dict().items():
            if whole or key in trainable:
                state[f"{name}.{key}"] = tensor.detach().to("cpu").contiguous()
    return state


def load_trained_state(trained: dict[str, "torch.nn.Module"], state: dict[str, "torch.Tensor"]) -> None:
    for name, module in trained.items():
        prefix = f"{name}."
        part = {key[len(prefix):]: tensor for key, tensor in state.items() if key.startswith(prefix)}
        missing = {key for key, p in module.named_parameters() if p.requires_grad} - set(part)
        if not part or missing:
            raise CheckpointError(f"checkpoint lacks weights of {name} ({len(missing)} missing); was it trained so?")
        module.load_state_dict(part, strict=False)


def capture_rng(generator: "torch.Generator") -> dict[str, Any]:
    """Every random state of this process: python, numpy, torch CPU, CUDA (when present), the trainer's."""
    import random

    import numpy as np
    import torch

    state = {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: "torch.Generator") -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_drift(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Flat config keys (`section.key`) whose values differ and that change what is trained.

    `train.max_steps` is free only for constant learning-rate schedules: the others are shaped by it.
    """
    free = FREE_KEYS + (("train.max_steps",) if current.get("schedule.name", "").startswith("constant") else ())
    changed = []
    for key in sorted(set(saved) | set(current)):
        if not key.startswith(free) and saved.get(key) != current.get(key):
            changed.append(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}")
    return changed
