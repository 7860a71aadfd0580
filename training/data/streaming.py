"""Training on WebDataset shards as a stream: disjoint shards per reader, a seeded shuffle buffer, exact resume.

Readers. Each training process reads with `max(1, data.num_workers)` readers (its DataLoader workers, or
itself), so a run has R = processes x readers. In epoch e the shards are permuted with (seed, e) and reader r
takes every R-th of them from position r: the readers of every process and worker read disjoint shards, and each
shard once per epoch. A reader's stream is its epochs one after the other; each epoch goes through a shuffle
buffer of `data.shuffle_buffer` samples seeded with (seed, e, r), emptied at the epoch's end.

Positions. Micro-batch K of process p (K counts from the start of the run) is read by reader slot K mod readers
of that process, and takes `train.batch_size` consecutive items of that reader's stream. A bad sample still takes
its slot (it is skipped in the batch and counted, as for indexed data), and every shard contributes exactly the
count the index gives it (missing samples of a damaged shard are bad slots), so how far each reader has read is a
pure function of the step: a resumed run re-reads the current epoch's consumed samples of each reader without
decoding them and continues bitwise where the interrupted run stopped (on a CPU).

The samples' crops and computed conditions draw from generators seeded by (seed, reader, position in its
stream); the step's noise and timesteps are the trainer's as for indexed data, at each sample's position in the
global batch (micro-step m of process p: positions (m x processes + p) x batch_size + slot).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import IterableDataset  # this module is loaded by the trainer only, which has torch

from controlkit.errors import ConfigError, ControlkitError
from training.data.batching import BatchLayout
from training.data.shards import Shard, iter_samples, sample_pair

#: Steps per "epoch" of the trainer's loop over a stream: the whole run is one DataLoader.
ONE_RANGE = 2**62


@dataclass(frozen=True)
class StreamPlan:
    """The shards of a stream and how they are split.

    Attributes:
        shards: the shard list. counts: samples per shard (empty shards are left out of `shards`).
        readers: readers per process (DataLoader workers, at least 1). processes: training processes.
        seed: the run's seed. buffer: shuffle-buffer size (0 or 1: the shards' own order).
    """

    shards: tuple[Shard, ...]
    counts: tuple[int, ...]
    readers: int
    processes: int
    seed: int
    buffer: int

    @property
    def total_readers(self) -> int:
        return self.readers * self.processes

    def epoch_shards(self, epoch: int, reader: int) -> list[int]:
        """Shard numbers reader `reader` (0 .. total_readers - 1) reads in `epoch`, in order."""
        import numpy as np

        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [int(number) for number in order[reader :: self.total_readers]]

    def epoch_length(self, epoch: int, reader: int) -> int:
        return sum(self.counts[number] for number in self.epoch_shards(epoch, reader))

    def locate(self, reader: int, position: int) -> tuple[int, int]:
        """(epoch, offset in it) of item `position` of a reader's stream."""
        epoch = 0
        while position >= (length := self.epoch_length(epoch, reader)):
            position -= length
            epoch += 1
        return epoch, position


def plan_stream(shards: Sequence[Shard], counts: Sequence[int], layout: BatchLayout, readers: int, seed: int,
                buffer: int) -> StreamPlan:
    """A `StreamPlan` over the non-empty shards.

    Raises:
        ConfigError: fewer non-empty shards than readers (each reader needs its own shards every epoch).
    """
    kept = [(shard, count) for shard, count in zip(shards, counts) if count > 0]
    total_readers = readers * layout.num_processes
    if len(kept) < total_readers:
        raise ConfigError(
            f"the data has {len(kept)} non-empty shards, but {layout.num_processes} processes x {readers} readers "
            f"(data.num_workers, at least 1) each need their own; write smaller shards (--shard-size) or lower "
            "data.num_workers"
        )
    return StreamPlan(tuple(shard for shard, _ in kept), tuple(count for _, count in kept), readers,
                      layout.num_processes, seed, buffer)


class StreamSampler:
    """The trainer's data order over a stream (the `StepSampler` interface of training/engine/run.py)."""

    def __init__(self, plan: StreamPlan, layout: BatchLayout, num_workers: int):
        self.plan, self.layout, self.num_workers = plan, layout, num_workers
        self.steps_per_epoch = ONE_RANGE
        self.indices = range(sum(plan.counts))

    def epoch_of(self, step: int) -> int:
        return 0

    def step_indices(self, step: int) -> list[int]:
        """A stream batch's items carry their position in the global batch as their index."""
        return list(range(self.layout.global_batch))

    def step_size(self, step: int) -> None:
        """Stream samples are cropped to the square of data.resolution."""
        return None

    def consumed(self, step: int, process: int, slot: int) -> int:
        """Items reader slot `slot` of `process` has read after `step` optimizer steps."""
        micro_batches = step * self.layout.accumulation
        return self.layout.batch_size * len(range(slot, micro_batches, self.plan.readers))

    def state(self, step: int) -> dict[str, Any]:
        """The stream position after `step` steps (saved with checkpoints, checked on resume)."""
        return {"kind": "stream", "step": step, "shards": len(self.plan.shards), "samples": sum(self.plan.counts),
                "readers": self.plan.total_readers, "seed": self.plan.seed, "shuffle_buffer": self.plan.buffer,
                "read": [self.consumed(step, process, slot) for process in range(self.plan.processes)
                         for slot in range(self.plan.readers)]}

    def resume_changes(self, saved: dict[str, Any]) -> list[str]:
        """What differs from the stream a checkpoint was taken on (each would change the order of the data)."""
        current = self.state(0)
        return [f"data stream {name}: {saved.get(name)!r} -> {current[name]!r}"
                for name in ("kind", "shards", "samples", "readers") if saved.get(name) != current[name]]

    def loader(self, transform: Any, first: int, last: int, process: int, pin_memory: bool) -> Any:
        """This process's DataLoader over optimizer steps [first, last)."""
        import torch

        from training.data.dataset import collate_pairs

        dataset = StreamingPairs(self, transform, first, last, process)
        return torch.utils.data.DataLoader(dataset, batch_size=None, collate_fn=collate_pairs,
                                           num_workers=self.num_workers,
                                           pin_memory=pin_memory,
                                           generator=torch.Generator().manual_seed(self.plan.seed))


class StreamingPairs(IterableDataset):
    """The micro-batches of one process over steps [first, last), read by its readers (an `IterableDataset`:
    each DataLoader worker yields whole micro-batches, which the DataLoader takes from them in turn)."""

    def __init__(self, sampler: StreamSampler, transform: Any, first: int, last: int, process: int):
        self.sampler, self.transform, self.first, self.last, self.process = sampler, transform, first, last, process

    def __iter__(self) -> Iterator[list[dict[str, Any] | None]]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        layout, plan = self.sampler.layout, self.sampler.plan
        start, stop = self.first * layout.accumulation, self.last * layout.accumulation
        for slot in range(plan.readers):
            if (slot - start - worker) % workers:  # this worker serves the slots of micro-batches start + worker + i*W
                continue
            yield from self._slot(slot, start, stop)

    def _slot(self, slot: int, start: int, stop: int) -> Iterator[list[dict[str, Any] | None]]:
        """Micro-batches K in [start, stop) with K mod readers == slot, from that reader's stream."""
        layout, plan = self.sampler.layout, self.sampler.plan
        reader = self.process * plan.readers + slot
        first_batch = next((k for k in range(start, start + plan.readers) if k % plan.readers == slot), None)
        batches = range(first_batch, stop, plan.readers) if first_batch is not None else range(0)
        if not batches:
            return
        position = self.sampler.consumed(self.first, self.process, slot)
        items = reader_items(plan, reader, position, self.transform.on_bad_pair == "fail")
        for micro in batches:
            step, within = divmod(micro, layout.accumulation)
            base = layout.slice_of(within, self.process).start
            batch = []
            for place in range(layout.batch_size):
                number, sample = next(items)
                batch.append(self.transform.stream_item(sample, base + place, (reader, number)))
            yield batch


def reader_items(plan: StreamPlan, reader: int, position: int, strict: bool) -> Iterator[tuple[int, Any]]:
    """(position, raw sample or None for a bad slot) of one reader's stream from `position` on, endless."""
    epoch, offset = plan.locate(reader, position)
    while True:
        for index, sample in enumerate(_epoch_samples(plan, epoch, reader, strict)):
            if index >= offset:  # the consumed part of a resumed epoch is read, not decoded
                yield position, sample
                position += 1
        epoch, offset = epoch + 1, 0


def _epoch_samples(plan: StreamPlan, epoch: int, reader: int, strict: bool) -> Iterator[Any]:
    """One epoch of a reader: its shards in order through the seeded shuffle buffer."""
    import numpy as np

    rng = np.random.default_rng([plan.seed, epoch, reader, 1])
    raw = (item for number in plan.epoch_shards(epoch, reader) for item in _exactly(plan, number, strict))
    if plan.buffer <= 1:
        yield from raw
        return
    buffer: list[Any] = []
    for item in raw:
        if len(buffer) < plan.buffer:
            buffer.append(item)
            continue
        chosen = int(rng.integers(len(buffer)))
        yield buffer[chosen]
        buffer[chosen] = item
    for chosen in rng.permutation(len(buffer)):
        yield buffer[int(chosen)]


def _exactly(plan: StreamPlan, number: int, strict: bool) -> Iterator[Any]:
    """A shard's samples, exactly its indexed count of them: a damaged or short shard fills its missing slots
    with None (bad samples), a longer one is cut, so that positions never shift."""
    import logging

    shard, count = plan.shards[number], plan.counts[number]
    given = 0
    try:
        for sample in iter_samples(shard.url):
            if given == count:
                return
            yield sample_pair(sample, shard.name)
            given += 1
    except ControlkitError as error:
        if strict:
            raise
        logging.getLogger(__name__).warning("skipping the rest of %s: %s", shard.url, error)
    yield from (None for _ in range(count - given))
