"""The order in which training sees its pairs: a pure function of (seed, step), shared by every process.

Each optimizer step takes one *global batch* of `batch_size x num_processes x accumulation` distinct pairs from
the epoch's permutation; micro-step m of process r takes slice `(m * num_processes + r) * batch_size` of it. So
the same samples meet the same noise however the global batch is split over processes and accumulation steps
(which is what makes a 2-process run match a 1-process run), and the position in the data is just the step
number: a resumed run jumps straight to it without reading any of the skipped pairs. An epoch's tail that does
not fill a global batch is left out (every process must get the same number of full batches).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from controlkit.errors import ConfigError


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's global batch is split.

    Attributes:
        batch_size: samples per process per micro-step.
        num_processes: data-parallel processes.
        accumulation: micro-steps per optimizer step.
    """

    batch_size: int
    num_processes: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes * self.accumulation

    def slice_of(self, micro_step: int, process: int) -> slice:
        start = (micro_step * self.num_processes + process) * self.batch_size
        return slice(start, start + self.batch_size)


class StepSampler:
    """Global batches of dataset indices, one per optimizer step.

    Args:
        indices: the usable dataset indices (bad pairs found while caching are left out).
        layout: the batch layout.
        seed: with the epoch number, seeds each epoch's permutation.

    Raises:
        ConfigError: fewer usable pairs than one global batch.
    """

    def __init__(self, indices: Sequence[int], layout: BatchLayout, seed: int):
        self.indices = list(indices)
        self.layout = layout
        self.seed = seed
        self.steps_per_epoch = len(self.indices) // layout.global_batch
        self._orders: dict[int, tuple[int, ...]] = {}
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the data has {len(self.indices)} usable pairs but one optimizer step needs {layout.global_batch} "
                f"(train.batch_size {layout.batch_size} x {layout.num_processes} processes x "
                f"train.gradient_accumulation_steps {layout.accumulation}); lower them or add pairs"
            )

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def step_indices(self, step: int) -> list[int]:
        """The global batch of optimizer step `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        size = self.layout.global_batch
        return list(order[within * size : (within + 1) * size])

    def _epoch_order(self, epoch: int) -> tuple[int, ...]:
        import numpy as np

        if epoch not in self._orders:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
            self._orders = {epoch: tuple(self.indices[i] for i in permutation)}  # one epoch at a time
        return self._orders[epoch]

    def step_size(self, step: int) -> tuple[int, int] | None:
        """(width, height) the samples of step `step` are cropped to; None: the square of `data.resolution`."""
        return None

    def resume_changes(self, saved: dict[str, Any]) -> list[str]:
        """What differs between the data a checkpoint was taken on (its `state`) and this sampler's."""
        current = self.state(0)
        changes = []
        if saved.get("kind") != current.get("kind"):
            changes.append(f"data: {saved.get('kind') or 'pairs'} -> {current.get('kind') or 'pairs'}")
        elif saved.get("usable_pairs") != current["usable_pairs"]:
            changes.append(f"usable pairs: {saved.get('usable_pairs')} -> {current['usable_pairs']}")
        elif saved.get("buckets") != current.get("buckets"):
            changes.append(f"data buckets: {saved.get('buckets')} -> {current.get('buckets')}")
        return changes

    def state(self, step: int) -> dict[str, Any]:
        """The data position after `step` optimizer steps (saved with checkpoints, checked on resume)."""
        return {
            "epoch": step // self.steps_per_epoch, "step_in_epoch": step % self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch, "usable_pairs": len(self.indices), "seed": self.seed,
        }


class ProcessBatches:
    """`batch_sampler` for one process's DataLoader over steps [first, last) of one epoch: yields this process's
    micro-batches (lists of dataset indices) in training order."""

    def __init__(self, sampler: StepSampler, first: int, last: int, process: int):
        self.sampler, self.first, self.last, self.process = sampler, first, last, process

    def __iter__(self) -> Iterator[list[int]]:
        layout = self.sampler.layout
        for step in range(self.first, self.last):
            indices = self.sampler.step_indices(step)
            for micro_step in range(layout.accumulation):
                yield indices[layout.slice_of(micro_step, self.process)]

    def __len__(self) -> int:
        return (self.last - self.first) * self.sampler.layout.accumulation


def epoch_ranges(sampler: StepSampler, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
    """(epoch, first step, last step) covering optimizer steps [start, stop), split at epoch boundaries."""
    step = start
    while step < stop:
        epoch = sampler.epoch_of(step)
        end = min(stop, (epoch + 1) * sampler.steps_per_epoch)
        yield epoch, step, end
        step = end
