"""The state of one training run as declared data (`Run`), how it is built (`create_run`), and what every recipe
shares: the accelerator, the optimizer, schedule and EMA, the data order, checkpoints and resume, logging.

What differs between a ControlNet run, a base run and a VAE run is the `Recipe` (training/engine/diffusion.py,
training/engine/autoencoder.py): which modules it trains, which data it reads, what one optimizer step computes,
how it validates and what it exports. The loop (training/engine/loop.py) calls the recipe; the recipe never
calls back into the loop.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from controlkit.errors import CheckpointError, ConfigError, ControlkitError
from training.data.batching import BatchLayout, ProcessBatches, StepSampler
from training.data.loading import is_stream, make_sampler
from training.engine import checkpoints
from training.engine.models import build_ema, build_lr_scheduler, build_optimizer, trained_parameters

if TYPE_CHECKING:
    import torch

    from training.config import TrainConfig


class TrainingDiverged(ControlkitError):
    """Too many non-finite losses in a row, or weights that an update made non-finite."""


class Recipe(Protocol):
    """What one kind of run (`model.kind`) adds to the shared machinery."""

    def load_models(self, config: "TrainConfig", device: Any, weight_dtype: "torch.dtype") -> dict[str, Any]:
        """Load every model of the run; return the modules being trained, by name (trainable, float32)."""

    def load_data(self, run: "Run") -> tuple[Any, list[int] | None]:
        """The training dataset and the indices of its readable pairs (None: all, bad ones found on the way)."""

    def step(self, run: "Run", step: int, micro_batches: Iterator[Any], state: LoopState) -> float | None:
        """One optimizer step over its micro-batches: the mean loss, or None when it was skipped."""

    def validate(self, run: "Run", step: int, should_stop: Callable[[], bool]) -> None:
        """Validation after optimizer step `step` (every process calls it)."""

    def export(self, run: "Run") -> Path | None:
        """Write the final model; its folder."""


@dataclass
class LoopState:
    """The loop's counters: steps done, non-finite and skipped counts (saved with checkpoints), recent losses."""

    step: int
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    overflow_skips: int = 0
    skipped_pairs: int = 0
    stopped_by: int = 0
    recent_losses: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # per optimizer step of this session; NaN: skipped


@dataclass
class Run:
    """Everything one training run holds.

    Attributes:
        trained: the modules being trained, by name ('controlnet', 'unet', 'text_encoder', 'vae'), unwrapped.
        prepared: the same modules as `accelerator.prepare` returned them (DDP wrappers): call these forward.
        parameters: the trained parameters (requires_grad) of `trained`, which the optimizer and EMA update.
        generator: the run's torch.Generator: noise, timesteps, prompt dropout, latent samples.
        counters: loop counters restored from the checkpoint the run resumed (empty for a fresh run).
    """

    config: "TrainConfig"
    recipe: Recipe
    accelerator: Any
    output_dir: Path
    checkpoints: Path
    trained: dict[str, Any]
    prepared: dict[str, Any]
    parameters: list[Any]
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    generator: "torch.Generator"
    dataset: Any = None
    layout: BatchLayout | None = None
    sampler: StepSampler | None = None
    start_step: int = 0
    last_saved_step: int = -1
    last_checkpoint: Path | None = None
    counters: dict[str, int] = field(default_factory=dict)
    on_step: Callable[[int], None] | None = None
    lineage: checkpoints.Lineage = field(default_factory=checkpoints.Lineage)


def create_run(config: "TrainConfig", recipe: Recipe) -> Run:
    """Accelerator, models, optimizer, data order, then the resume asked for (`checkpoint.resume`)."""
    import torch

    from training.config_rules import machine_settings

    config, notes = machine_settings(config)
    for note in notes if os.environ.get("RANK", "0") == "0" else ():
        print(f"note: {note}", file=sys.stderr)
    output_dir = Path(config.train.output_dir)
    checkpoint_root = checkpoints.checkpoint_dir(output_dir)
    resume_from = check_output(config, checkpoint_root)  # before the accelerator, which opens OUTPUT/logs
    accelerator = make_accelerator(config)
    if config.train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtypes = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    trained = recipe.load_models(config, accelerator.device, dtypes[config.train.mixed_precision])
    parameters = trained_parameters(trained)
    optimizer = build_optimizer(config, parameters, accelerator.device)
    lr_scheduler = build_lr_scheduler(config, optimizer)
    ema = build_ema(config, parameters)
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None:  # our DataLoaders are not prepared, so DeepSpeed is told the batch size
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = config.train.batch_size
    *prepared, optimizer = accelerator.prepare(*trained.values(), optimizer)
    generator = torch.Generator(accelerator.device).manual_seed(config.train.seed)
    run = Run(config, recipe, accelerator, output_dir, checkpoint_root, trained, dict(zip(trained, prepared)),
              parameters, optimizer, lr_scheduler, ema, generator)
    run.dataset, usable = recipe.load_data(run)
    run.layout = BatchLayout(config.train.batch_size, accelerator.num_processes,
                             config.train.gradient_accumulation_steps)
    run.sampler = make_sampler(run.dataset, usable, run.layout, config)
    if resume_from is not None:
        resume(run, resume_from)
    return run


def make_loader(run: Run, epoch: int, first: int, last: int) -> Any:
    """This process's DataLoader over optimizer steps [first, last) of `epoch`."""
    import torch

    from training.data.dataset import collate_pairs

    if is_stream(run.dataset):
        return run.sampler.loader(run.dataset.transform, first, last, run.accelerator.process_index,
                                  pin_memory=run.accelerator.device.type == "cuda")
    run.dataset.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        run.dataset, batch_sampler=ProcessBatches(run.sampler, first, last, run.accelerator.process_index),
        collate_fn=collate_pairs, num_workers=run.config.data.num_workers,
        pin_memory=run.accelerator.device.type == "cuda",
        # Its own generator: worker seeds are drawn from it, not from the global torch RNG, which then evolves
        # the same in a resumed run as in a straight one.
        generator=torch.Generator().manual_seed(run.config.train.seed + epoch),
    )


def step_positions(run: Run, step: int) -> dict[int, int]:
    """Dataset index -> its position in the global batch of optimizer step `step` (where its draws are)."""
    return {index: position for position, index in enumerate(run.sampler.step_indices(step))}


# -- checkpoints -------------------------------------------------------------------------------------------------

def save_checkpoint(run: Run, state: LoopState) -> Path:
    """A checkpoint of the run after `state.step` optimizer steps (rotated by `checkpoint.total_limit`)."""
    run_state = {
        "step": state.step, "data": run.sampler.state(state.step), "config": run.config.flat(),
        "world_size": run.accelerator.num_processes,
        "counters": {"nonfinite_total": state.nonfinite_total, "nonfinite_in_a_row": state.nonfinite_in_a_row,
                     "skipped_pairs": state.skipped_pairs, "overflow_skips": state.overflow_skips},
    }
    check_finite_weights(run, state.step)
    run.last_checkpoint = checkpoints.save_checkpoint(
        run.accelerator, run.checkpoints, state.step, _checkpointed(run), run_state,
        total_limit=run.config.checkpoint.total_limit, lineage=run.lineage,
    )
    run.last_saved_step = state.step
    return run.last_checkpoint


def resume(run: Run, path: Path) -> None:
    """Restore the run from the checkpoint `path`; refuse one whose settings would change the run."""
    saved = checkpoints.load_checkpoint(run.accelerator, path, _checkpointed(run))
    changes = checkpoints.config_drift(saved["config"], run.config.flat())
    if saved["world_size"] != run.accelerator.num_processes:
        changes.append(f"processes: {saved['world_size']} -> {run.accelerator.num_processes}")
    changes += run.sampler.resume_changes(saved["data"])
    if changes and not run.config.checkpoint.allow_config_change:
        raise CheckpointError(
            f"resuming {path} would change the run: {'; '.join(changes)}; restore these settings or pass "
            "checkpoint.allow_config_change=true"
        )
    run.start_step = run.last_saved_step = int(saved["step"])
    run.last_checkpoint = path
    run.counters = saved["counters"]
    run.lineage = checkpoints.continue_lineage(run.checkpoints, path)


def check_finite_weights(run: Run, step: int) -> None:
    """Refuse to save weights that an update made non-finite (a learning rate too high for the data): such a
    checkpoint or model would be all NaN. Every process holds the same weights, so all of them raise.

    Raises:
        TrainingDiverged: naming the step, the learning rate and the last checkpoint that is still good.
    """
    import torch

    tensors = list(run.parameters) + (list(run.ema.shadow_params) if run.ema is not None else [])
    if all(bool(torch.isfinite(tensor).all()) for tensor in tensors):
        return
    kept = f"; the last good checkpoint is {run.last_checkpoint}" if run.last_checkpoint is not None else ""
    raise TrainingDiverged(
        f"the trained weights are not finite after step {step} (an update overflowed); nothing was saved; lower "
        f"optim.learning_rate (now {run.config.optim.learning_rate:g}){kept}"
    )


def _checkpointed(run: Run) -> checkpoints.TrainingObjects:
    return checkpoints.TrainingObjects(run.trained, run.optimizer, run.lr_scheduler, run.ema, run.generator)


@contextlib.contextmanager
def ema_weights(run: Run, *, when: bool = True) -> Iterator[None]:
    """The trained modules hold their EMA weights inside the block (when EMA is on and `when`), their own after."""
    swap = run.ema is not None and when
    if swap:
        run.ema.store(run.parameters)
        run.ema.copy_to(run.parameters)
    try:
        yield
    finally:
        if swap:
            run.ema.restore(run.parameters)


# -- logging -----------------------------------------------------------------------------------------------------

def log_metrics(run: Run, state: LoopState, samples_per_second: float, progress: Any) -> None:
    loss = sum(state.recent_losses) / len(state.recent_losses) if state.recent_losses else float("nan")
    values = {
        "loss": loss, "lr": run.lr_scheduler.get_last_lr()[0], "samples_per_second": samples_per_second,
        "memory_gib": peak_memory_gib(run.accelerator.device), "nonfinite_steps": state.nonfinite_total,
        "skipped_pairs": state.skipped_pairs, "fp16_overflow_steps": state.overflow_skips,
    }
    run.accelerator.log(values, step=state.step)
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{values['lr']:.2e}", sps=f"{samples_per_second:.1f}",
                         mem=f"{values['memory_gib']:.1f}G", refresh=False)


def peak_memory_gib(device: Any) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the resident set size."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# -- setup -------------------------------------------------------------------------------------------------------

def make_accelerator(config: "TrainConfig") -> Any:
    """The Accelerator of a run: mixed precision, accumulation, TensorBoard logs, collective timeout."""
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    # accelerate keeps its settings per process; a run before this one in the same process (a notebook, a test
    # session) must not decide this run's precision or accumulation. The process group itself is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    output = Path(config.train.output_dir)
    accelerator = Accelerator(
        cpu=_cpu_processes(),
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        mixed_precision=config.train.mixed_precision,
        log_with=None if config.logging.report_to == "none" else config.logging.report_to,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=config.train.process_timeout_minutes))],
    )
    if config.logging.report_to != "none":
        hparams = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                   for key, value in config.flat().items()}
        accelerator.init_trackers("controlkit", config=hparams)
    return accelerator


def _cpu_processes() -> bool:
    """Several processes (torchrun) on a machine without accelerators: accelerate joins them over gloo only when
    told to run on the CPU (`accelerate launch` tells it; torchrun does not)."""
    import os

    import torch

    has_accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return not has_accelerator and int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_output(config: "TrainConfig", checkpoint_root: Path) -> Path | None:
    """Fail before any work on an output the run could not write: an unwritable `train.output_dir`, a file where
    the run writes a folder (or a folder where it writes a file), unwritable cache folders, or a fresh run into an
    earlier run's folder; and on data sources that do not exist. Returns the checkpoint to resume from (None for
    a fresh run).

    Raises:
        ConfigError, OutputError, CheckpointError: one line naming the key or path and the fix.
    """
    import tempfile

    from controlkit.files import check_output_folder

    output_dir, resume_from = Path(config.train.output_dir), config.checkpoint.resume
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=output_dir, prefix=".write-test-")
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"`train.output_dir` {output_dir} is not writable ({error.strerror or error}); "
                          "choose another folder") from None
    for path, folder in _run_outputs(config, output_dir):
        if path.exists() and path.is_dir() != folder:
            kind, wanted = ("a file", "folder") if folder else ("a folder", "file")
            raise ConfigError(f"`train.output_dir` {output_dir}: {path} is {kind}, but the run writes its {wanted} "
                              "there; move it away or choose another train.output_dir")
    for key, folder in (("data.cache_dir", config.data.cache_dir), ("data.condition_cache_dir",
                                                                   config.data.condition_cache_dir)):
        if folder:
            check_output_folder(folder, f"`{key}`")
    for key, source in (("data.source", config.data.source), ("validation.source", config.validation.source)):
        if source and _is_shards(source):  # listed now (local or remote), not after the models have loaded
            continue
        if source and not Path(source).exists():  # found now, not after the models have loaded
            raise ConfigError(f"`{key}` {source}: no such file or folder; give a manifest (.jsonl), prompt.json "
                              "or a folder")
    path = checkpoints.resolve_resume(checkpoint_root, resume_from)
    if not resume_from and checkpoints.list_checkpoints(checkpoint_root):
        raise ConfigError(
            f"`train.output_dir` {output_dir} holds checkpoints of an earlier run; continue it with "
            "checkpoint.resume=latest, or choose another train.output_dir"
        )
    return path


def _is_shards(source: str) -> bool:
    """A WebDataset shard source; raises ConfigError (one line) when it names no shard."""
    from training.data.shards import is_shard_source, resolve_shards

    if not is_shard_source(source):
        return False
    resolve_shards(source)
    return True


def _run_outputs(config: "TrainConfig", output_dir: Path) -> list[tuple[Path, bool]]:
    """(path, is a folder) of everything a run writes in `train.output_dir`."""
    model = config.model
    outputs = [(output_dir / name, True) for name in ("checkpoints", "logs", "validation")]
    outputs.append((output_dir / ("controlnet" if model.kind == "controlnet" else "model"), True))
    if model.kind == "controlnet" and model.unlock_decoder:
        outputs.append((output_dir / "base", True))
    if model.kind == "controlnet" and config.checkpoint.save_original:
        outputs.append((original_path(config), False))
    if config.data.cache_encodings and not config.data.cache_dir:
        outputs.append((output_dir / "cache", True))
    return outputs


def original_path(config: "TrainConfig") -> Path:
    """OUTPUT/<output folder name>.safetensors: the ControlNet in the original key format
    (`checkpoint.save_original`)."""
    output = Path(config.train.output_dir)
    return output / f"{output.resolve().name}.safetensors"
