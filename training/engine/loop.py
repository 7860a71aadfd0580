"""The training loop: optimizer steps over the sampler's global batches, with checkpoints, validation, logging,
signal handling and non-finite-loss skipping.

Faults:
- SIGTERM, SIGINT and SIGUSR1 (Slurm's warning signal) only set a flag. At the next step boundary the processes
  agree on it (a process that stopped alone would hang the others), save a checkpoint and return; the command
  then exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT). A second signal exits at once.
- A non-finite loss on any process skips the optimizer step on all of them (no update, gradients dropped) and is
  counted; after `train.max_consecutive_nonfinite` in a row the run stops with an error. Weights are never
  updated from a non-finite gradient, so no checkpoint ever holds one.
"""

from __future__ import annotations

import math
import signal
import time
from typing import TYPE_CHECKING, Any

from training.data.batching import epoch_ranges
from training.engine.run import LoopState, TrainingDiverged, log_metrics, make_loader, save_checkpoint

if TYPE_CHECKING:
    from training.engine.run import Run

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))

__all__ = ["STOP_SIGNALS", "StopFlag", "TrainingDiverged", "apply_update", "backward_if_finite", "finish_step",
           "run_loop"]


class StopFlag:
    """Catches the stop signals while active (main thread only): the handler records the signal, nothing else."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum: int, frame: Any) -> None:
        if self.signum:  # a second signal: the user insists; checkpoints are atomic, so leaving now is safe
            raise SystemExit(128 + signum)
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def agreed(self, accelerator: Any) -> int:
        """The signal number if any process was signalled (the same answer on every process), else 0."""
        return int(_reduce_max(accelerator, float(self.signum)))


def run_loop(run: "Run") -> LoopState:
    """Train from optimizer step `run.start_step` to `train.max_steps` (or until a stop signal): each step is the
    recipe's (`run.recipe.step`); checkpoints, logging, stop signals and validation are the same for every run."""
    config, accelerator, start_step = run.config, run.accelerator, run.start_step
    state = LoopState(step=start_step, **run.counters)
    progress = _progress_bar(run, start_step)
    window_start, window_steps = time.perf_counter(), 0
    with StopFlag() as stop:
        for epoch, first, last in epoch_ranges(run.sampler, start_step, config.train.max_steps):
            micro_batches = iter(make_loader(run, epoch, first, last))
            for step in range(first, last):
                loss = run.recipe.step(run, step, micro_batches, state)
                state.step, window_steps = step + 1, window_steps + 1
                state.losses.append(math.nan if loss is None else loss)
                if loss is not None:
                    state.recent_losses.append(loss)
                if state.step % config.logging.every_steps == 0 or state.step == config.train.max_steps:
                    rate = window_steps * run.layout.global_batch / (time.perf_counter() - window_start)
                    log_metrics(run, state, rate, progress)
                    window_start, window_steps, state.recent_losses = time.perf_counter(), 0, []
                progress.update(1)
                if run.on_step is not None:
                    run.on_step(state.step)
                state.stopped_by = stop.agreed(accelerator)
                if state.stopped_by or _due(state.step, config.checkpoint.every_steps):
                    save_checkpoint(run, state)
                if state.stopped_by:
                    break
                if _due(state.step, config.validation.every_steps):
                    run.recipe.validate(run, state.step, lambda: bool(stop.signum))
            if state.stopped_by:
                break
    progress.close()
    return state


def backward_if_finite(accelerator: Any, loss: Any, losses: list) -> bool:
    """Backpropagate `loss` and keep it in `losses` if it is finite on every process; else do nothing and return
    False, so that every process skips the step together."""
    if _reduce_max(accelerator, 0.0 if bool(loss.isfinite()) else 1.0):
        return False
    accelerator.backward(loss)
    losses.append(loss.detach())
    return True


def finish_step(run: "Run", state: LoopState, step: int, finite: bool, losses: list) -> float | None:
    """Apply the accumulated update when every micro-batch was finite; count non-finite steps and stop after
    `train.max_consecutive_nonfinite` in a row. Returns the mean loss, or None for a skipped step."""
    if finite:
        finite = apply_update(run, state)
    run.optimizer.zero_grad(set_to_none=True)
    if not finite:
        state.nonfinite_in_a_row += 1
        state.nonfinite_total += 1
        if state.nonfinite_in_a_row >= run.config.train.max_consecutive_nonfinite:
            raise TrainingDiverged(
                f"{state.nonfinite_in_a_row} non-finite losses in a row at step {step + 1} (each step was skipped, "
                "the weights are unchanged); lower optim.learning_rate, use train.mixed_precision='bf16' or 'no', "
                "or check the data"
            )
        return None
    state.nonfinite_in_a_row = 0
    return float(sum(loss.item() for loss in losses) / len(losses))


def apply_update(run: "Run", state: LoopState) -> bool:
    """Clip, check the gradient norm, step the optimizer, the LR schedule and the EMA. False: skipped (non-finite)."""
    accelerator = run.accelerator
    max_norm = run.config.train.max_grad_norm or math.inf
    norm = accelerator.clip_grad_norm_(run.parameters, max_norm)
    scaled = accelerator.scaler is not None  # fp16: the grad scaler skips overflowing steps and lowers its scale
    if not scaled and norm is not None and not math.isfinite(float(norm)):
        return False
    run.optimizer.step()
    if accelerator.optimizer_step_was_skipped:
        state.overflow_skips += 1
        return True
    run.lr_scheduler.step()
    if run.ema is not None:
        run.ema.step(run.parameters)
    return True


def _reduce_max(accelerator: Any, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    import torch

    return float(accelerator.reduce(torch.tensor([value], device=accelerator.device), reduction="max").item())


def _due(step: int, every: int) -> bool:
    return bool(every) and step % every == 0


def _progress_bar(run: "Run", start_step: int) -> Any:
    from tqdm.auto import tqdm

    enabled = run.config.logging.progress_bar and run.accelerator.is_main_process
    return tqdm(total=run.config.train.max_steps, initial=start_step, desc="train", disable=not enabled)
