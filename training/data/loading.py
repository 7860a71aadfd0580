"""The training data a `[data]` config names, and the order the trainer reads it in.

`training_data(config, condition_fn)` gives either a `PairedDataset` over the pairs of an indexed source
(manifest, folder, Hugging Face dataset), with each pair's bucket when `data.buckets` is on, or a `StreamSource`
over WebDataset shards. `make_sampler` then gives the order: `StepSampler` (training/data/batching.py),
`BucketSampler` (training/data/buckets.py) or `StreamSampler` (training/data/streaming.py), each a pure function
of (seed, step) so that a resumed run reads what the interrupted one would have read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from training.data.batching import BatchLayout, StepSampler

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.data.dataset import PairedDataset
    from training.data.shards import Shard


@dataclass
class StreamSource:
    """Shards read as a stream; `transform` turns each sample into a training item (resize, crop, condition).

    Attributes:
        transform: a `PairedDataset` without pairs of its own: the per-pair rules of indexed data.
        shards, counts: the shards and their sample counts. buffer: `data.shuffle_buffer`.
    """

    transform: PairedDataset
    shards: Sequence[Shard]
    counts: Sequence[int]
    buffer: int
    pairs: tuple = ()  # nothing to encode ahead of training: a stream is encoded per step

    def set_epoch(self, epoch: int) -> None:
        """Streams draw per (reader, position), not per epoch."""

    def __len__(self) -> int:
        return sum(self.counts)


def is_stream(dataset: Any) -> bool:
    return isinstance(dataset, StreamSource)


def training_data(config: TrainConfig, condition_fn: Any) -> PairedDataset | StreamSource:
    """The dataset of a run (module docstring); pairs are cut to `data.max_samples` when it is set."""
    from training.data.dataset import PairedDataset, load_training_pairs
    from training.data.shards import is_shard_source, resolve_shards, shard_counts

    data = config.data
    options = {"resolution": data.resolution, "center_crop": data.center_crop, "condition_fn": condition_fn,
               "cache_dir": data.condition_cache_dir or None, "on_bad_pair": data.on_bad_pair,
               "seed": config.train.seed}
    if is_shard_source(data.source):
        shards = resolve_shards(data.source)
        counts = shard_counts(shards)
        if data.max_samples:
            shards, counts = _first_samples(shards, counts, data.max_samples)
        return StreamSource(PairedDataset([], **options), shards, counts, data.shuffle_buffer)
    pairs = load_training_pairs(data)
    buckets = None
    if data.buckets:
        from training.data.buckets import assign_buckets
        from training.data.dataset import read_source

        buckets = assign_buckets([_readable(read_source, pair.image) for pair in pairs], data.resolution)
    return PairedDataset(pairs, buckets=buckets, **options)


def _readable(read_source: Any, reference: Any) -> Any:
    try:
        return read_source(reference, "image")
    except Exception:  # an unreadable cell: the pair is found bad (and counted) when it is read for training
        return None


def _first_samples(shards: Sequence[Shard], counts: Sequence[int], limit: int) -> tuple[list, list]:
    """The shards holding the first `limit` samples (whole shards: a stream reads shards whole)."""
    kept, kept_counts, total = [], [], 0
    for shard, count in zip(shards, counts):
        if total >= limit:
            break
        kept.append(shard)
        kept_counts.append(count)
        total += count
    return kept, kept_counts


def make_sampler(dataset: Any, usable: Sequence[int] | None, layout: BatchLayout, config: TrainConfig) -> Any:
    """The data order of a run over `dataset` (`usable`: the readable indices the encoding cache found)."""
    seed = config.train.seed
    if is_stream(dataset):
        from training.data.streaming import StreamSampler, plan_stream

        readers = max(1, config.data.num_workers)
        plan = plan_stream(dataset.shards, dataset.counts, layout, readers, seed, dataset.buffer)
        return StreamSampler(plan, layout, config.data.num_workers)
    indices = usable if usable is not None else range(len(dataset))
    if dataset.buckets is not None:
        from training.data.buckets import BucketSampler

        return BucketSampler(indices, dataset.buckets, layout, seed)
    return StepSampler(indices, layout, seed)
