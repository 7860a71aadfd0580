"""Train a ControlNet (or the demo's base U-Net or VAE) from a `TrainConfig`: `train(config) -> TrainResult`.

    >>> from training.config import load_config
    >>> from training.trainer import train
    >>> result = train(load_config("training/configs/canny_sd15.toml", ["data.source=fill50k/prompt.json"]))
    >>> result.output                                   # OUTPUT/controlnet: use with controlkit generate

Setup (`Run.create`): an accelerate `Accelerator` (mixed precision, gradient accumulation, DDP/DeepSpeed/FSDP from
`accelerate launch`), the models (training/components.py), the data and its encoding cache, optimizer, schedule
and EMA, then a resume if asked. The loop is in training/loop.py, the step's math in training/step.py, the
checkpoints in training/checkpointing.py. Output, in `train.output_dir`:

    controlnet/                 the ControlNet, diffusers format + condition metadata (kind 'controlnet')
    <output name>.safetensors   the same in the original key format (checkpoint.save_original)
    base/                       the base with its trained decoder (model.unlock_decoder)
    model/                      the trained base model, a diffusers folder (kind 'base'; kind 'vae': with the
                                trained VAE, see training/autoencoder.py)
    checkpoints/, logs/, validation/, cache/
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit.errors import ConfigError
from training import checkpointing
from training.checkpointing import TrainingObjects
from training.components import build_ema, build_lr_scheduler, build_optimizer, load_components
from training.inputs import BatchEncoder
from training.loop import LoopState, run_loop
from training.sampler import BatchLayout, ProcessBatches, StepSampler

if TYPE_CHECKING:
    from training.config import TrainConfig


@dataclass
class TrainResult:
    """What a run ended with: the step reached, the final model folder (None when interrupted), the last
    checkpoint, the signal that stopped it (0: ran to the end), counters, and the mean loss of each optimizer
    step run in this session (NaN for a skipped step)."""

    step: int
    output: Path | None
    checkpoint: Path | None
    stopped_by: int
    nonfinite_steps: int
    skipped_pairs: int
    losses: list[float]


def train(config: "TrainConfig", *, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Run a training job to `train.max_steps` (resuming per `checkpoint.resume`); see the module docstring.

    Args:
        on_step: called on the main thread after every optimizer step with the number of steps done.
    """
    run_class = Run
    if config.model.kind == "vae":
        from training.autoencoder import AutoencoderRun as run_class
    run = run_class.create(config)
    run.on_step = on_step
    try:
        state = run_loop(run, run.start_step)
        if not state.stopped_by and run.last_saved_step != state.step:
            run.save_checkpoint(state)
        output = None if state.stopped_by else run.save_output()
        return TrainResult(state.step, output, run.last_checkpoint, state.stopped_by, state.nonfinite_total,
                           state.skipped_pairs, state.losses)
    finally:
        run.accelerator.end_training()


class Run:
    """Everything one training run holds (built by `Run.create`)."""

    last_saved_step = -1
    last_checkpoint: Path | None = None
    on_step: Callable[[int], None] | None = None
    counters: dict[str, int] = {}  # restored from the checkpoint a run resumes

    @classmethod
    def create(cls, config: "TrainConfig") -> "Run":
        run = cls()
        run.config, run.output_dir = config, Path(config.train.output_dir)
        run.accelerator = make_accelerator(config)
        run.checkpoints = checkpointing.checkpoint_dir(run.output_dir)
        resume_from = _check_output(run.output_dir, run.checkpoints, config.checkpoint.resume)
        run._setup_models()
        run._setup_data()
        run.start_step = run._resume(resume_from) if resume_from is not None else 0
        run._setup_validation()
        return run

    def _setup_validation(self) -> None:
        from training.validation import Validator

        self.validator = Validator(self.config, self) if self.config.validation.every_steps else None

    def _setup_models(self) -> None:
        import torch

        config, accelerator = self.config, self.accelerator
        if config.train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        dtypes = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        weight_dtype = dtypes[config.train.mixed_precision]
        self.parts = load_components(config, accelerator.device, weight_dtype)
        self.parameters = self.parts.trainable_parameters()
        self.optimizer = build_optimizer(config, self.parameters, accelerator.device)
        self.lr_scheduler = build_lr_scheduler(config, self.optimizer)
        self.ema = build_ema(config, self.parameters)
        names = list(self.parts.trained)
        deepspeed = accelerator.state.deepspeed_plugin
        if deepspeed is not None:  # our DataLoaders are not prepared, so DeepSpeed is told the batch size
            deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = config.train.batch_size
        prepared = accelerator.prepare(*self.parts.trained.values(), self.optimizer)
        self.forward_modules = dict(zip(names, prepared[:-1]))
        self.optimizer = prepared[-1]
        self.unet_forward = self.forward_modules.get("unet", self.parts.unet)
        self.generator = torch.Generator(accelerator.device).manual_seed(config.train.seed)

    def _setup_data(self) -> None:
        from training.data import PairedDataset, load_training_pairs, make_condition_fn

        config, data = self.config, self.config.data
        pairs = load_training_pairs(data)
        condition_fn = image_as_condition if config.model.kind == "base" else None  # a base model uses none
        if data.preprocessor:
            ranges = {name: tuple(bounds) for name, bounds in data.randomize.items()}
            condition_fn = make_condition_fn(data.preprocessor, data.preprocessor_params, ranges)
        self.dataset = PairedDataset(
            pairs, resolution=data.resolution, center_crop=data.center_crop, condition_fn=condition_fn,
            cache_dir=data.condition_cache_dir or None, on_bad_pair=data.on_bad_pair, seed=config.train.seed,
        )
        text_encoder = self.forward_modules.get("text_encoder")
        self.encoder = BatchEncoder(config, self.parts, self.accelerator.device, text_encoder)
        usable = None
        if data.cache_encodings:
            cache_root = Path(data.cache_dir) if data.cache_dir else self.output_dir / "cache"
            usable = self.encoder.build_caches(self.accelerator, self.dataset, cache_root)
        self.layout = BatchLayout(config.train.batch_size, self.accelerator.num_processes,
                                  config.train.gradient_accumulation_steps)
        self.sampler = StepSampler(usable if usable is not None else range(len(self.dataset)), self.layout,
                                   config.train.seed)

    def loader(self, epoch: int, first: int, last: int) -> Any:
        """This process's DataLoader over optimizer steps [first, last) of `epoch`."""
        import torch

        from training.data import collate_pairs

        self.dataset.set_epoch(epoch)
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=ProcessBatches(self.sampler, first, last, self.accelerator.process_index),
            collate_fn=collate_pairs, num_workers=self.config.data.num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
            # Its own generator: worker seeds are drawn from it, not from the global torch RNG, which then evolves
            # the same in a resumed run as in a straight one.
            generator=torch.Generator().manual_seed(self.config.train.seed + epoch),
        )

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def optimizer_step(self, step: int, micro_batches: Any, state: LoopState) -> float | None:
        """One optimizer step of this run's model (`training.loop.optimizer_step`); the mean loss or None."""
        from training import loop

        return loop.optimizer_step(self, step, micro_batches, state)

    def objects(self) -> TrainingObjects:
        return TrainingObjects(self.parts.trained, self.optimizer, self.lr_scheduler, self.ema, self.generator)

    def save_checkpoint(self, state: LoopState) -> Path:
        run_state = {
            "step": state.step, "data": self.sampler.state(state.step), "config": self.config.flat(),
            "world_size": self.accelerator.num_processes,
            "counters": {"nonfinite_total": state.nonfinite_total, "nonfinite_in_a_row": state.nonfinite_in_a_row,
                         "skipped_pairs": state.skipped_pairs, "overflow_skips": state.overflow_skips},
        }
        self.last_checkpoint = checkpointing.save_checkpoint(
            self.accelerator, self.checkpoints, state.step, self.objects(), run_state,
            total_limit=self.config.checkpoint.total_limit,
        )
        self.last_saved_step = state.step
        return self.last_checkpoint

    def _resume(self, path: Path) -> int:
        from controlkit.errors import CheckpointError

        saved = checkpointing.load_checkpoint(self.accelerator, path, self.objects())
        changes = checkpointing.config_drift(saved["config"], self.config.flat())
        if saved["world_size"] != self.accelerator.num_processes:
            changes.append(f"processes: {saved['world_size']} -> {self.accelerator.num_processes}")
        if saved["data"]["usable_pairs"] != len(self.sampler.indices):
            changes.append(f"usable pairs: {saved['data']['usable_pairs']} -> {len(self.sampler.indices)}")
        if changes and not self.config.checkpoint.allow_config_change:
            raise CheckpointError(
                f"resuming {path} would change the run: {'; '.join(changes)}; restore these settings or pass "
                "checkpoint.allow_config_change=true"
            )
        self.last_saved_step, self.last_checkpoint = saved["step"], path
        self.counters = saved["counters"]
        return int(saved["step"])

    # -- logging, validation, output -----------------------------------------------------------------------------

    def log_metrics(self, state: LoopState, samples_per_second: float, progress: Any) -> None:
        loss = sum(state.recent_losses) / len(state.recent_losses) if state.recent_losses else float("nan")
        values = {
            "loss": loss, "lr": self.lr_scheduler.get_last_lr()[0], "samples_per_second": samples_per_second,
            "memory_gib": peak_memory_gib(self.accelerator.device), "nonfinite_steps": state.nonfinite_total,
            "skipped_pairs": state.skipped_pairs, "fp16_overflow_steps": state.overflow_skips,
        }
        self.accelerator.log(values, step=state.step)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{values['lr']:.2e}", sps=f"{samples_per_second:.1f}",
                             mem=f"{values['memory_gib']:.1f}G", refresh=False)

    def validate(self, step: int, should_stop: Any) -> None:
        if self.validator is not None:
            self.validator.run(step, should_stop)

    def save_output(self) -> Path | None:
        from training.output import save_output

        return save_output(self)


def image_as_condition(image: Any, rng: Any) -> Any:
    """The condition function of base-model training: pairs need no map, and the image stands in for it."""
    return image


def make_accelerator(config: "TrainConfig") -> Any:
    """The Accelerator of a run: mixed precision, accumulation, TensorBoard logs, collective timeout."""
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import ProjectConfiguration

    from accelerate.state import AcceleratorState, GradientState

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


def _check_output(output_dir: Path, checkpoints: Path, resume: str) -> Path | None:
    """Fail early on an unwritable output folder or on a fresh run into an earlier run's folder; returns the
    checkpoint to resume from."""
    import os
    import tempfile

    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=output_dir, prefix=".write-test-")
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"`train.output_dir` {output_dir} is not writable ({error.strerror or error}); "
                          "choose another folder") from None
    path = checkpointing.resolve_resume(checkpoints, resume)
    if not resume and checkpointing.list_checkpoints(checkpoints):
        raise ConfigError(
            f"`train.output_dir` {output_dir} holds checkpoints of an earlier run; continue it with "
            "checkpoint.resume=latest, or choose another train.output_dir"
        )
    return path


def peak_memory_gib(device: Any) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the resident set size."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
