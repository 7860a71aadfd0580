"""Writing WebDataset shards of pairs: each shard annotated and written whole by one worker, then indexed.

    >>> from training.data.shard_writer import build_shards
    >>> report = build_shards("photos/", "canny", "pairs/", shard_size=1000)           # or SHARDS in, shards out
    >>> report.index, report.samples, report.ok
    (PosixPath('pairs/shards.json'), 120, True)

The unit of work is a shard (`ShardTask`): a folder of images is cut, in `image_files` order, into shards of
`shard_size` samples (keys 000000000, 000000001, ...: the sample's number in that order); input shards
(img2dataset's jpg/txt/json) give one output shard each, keys kept. A worker (a process of the local engine, or a
Ray actor) reads, decodes (`controlkit.image.load_image`) and annotates every sample of its shard and writes the
tar through `controlkit.files.atomic_path` with webdataset's `TarWriter` (fixed times and owners: the same inputs
give the same bytes, whichever engine). A bad sample is left out and reported by name; the rest of the shard is
written.

Resume: `shards.json` is rewritten (atomically) after every finished shard and lists each one with its sample
count and a digest of its plan (the inputs, captions, preprocessor and parameters). A re-run skips every shard
that the index lists with the same plan, and re-reports what failed in it; `overwrite` redoes them all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from controlkit.errors import ControlkitError, OutputError, first_line
from training.data.shard_plan import ShardReport, ShardTask, plan_folder, plan_shards

#: Samples per shard by default (about 0.2-1 GB of 512 px photos and maps).
SHARD_SIZE = 1000
#: Tar member times and owners, fixed so that a shard's bytes depend on its content only.
TAR_OPTIONS = {"mtime": 0.0, "user": "controlkit", "group": "controlkit", "mode": 0o444}


def build_shards(
    source: str | os.PathLike, preprocessor: str, output: str | os.PathLike, *, params: dict[str, Any] | None = None,
    shard_size: int = SHARD_SIZE, caption_from: str = "txt", workers: int = 1, engine: str = "local",
    address: str | None = None, gpus_per_worker: float = 0.0, overwrite: bool = False, progress: bool = False,
) -> ShardReport:
    """Annotate a folder of images, or shards, into condition shards in `output` (+ `output`/shards.json).

    Args:
        source: a folder of images (searched recursively) or a shard source (training/data/shards.py).
        preprocessor, params: the registry preprocessor and its parameters.
        shard_size: samples per shard (folder input; input shards keep their samples).
        caption_from: folder input: "txt" (same-stem .txt files) or "filename".
        workers, engine, address, gpus_per_worker: as `preprocessors.batch.annotate_paths`; a worker writes
            one shard at a time.
        overwrite: rewrite shards the index already lists.

    Raises:
        ConfigError: no image has a caption (folder input), a bad shard size, or an unreadable source.
        OutputError: `output` cannot be written (checked before any work).
        ValueError: an unknown preprocessor or parameter.
    """
    from controlkit.files import check_output_folder, remove_stale_temporaries
    from preprocessors.batch import check_engine
    from preprocessors.registry import get_preprocessor
    from training.data.shards import is_shard_source

    params = dict(params or {})
    check_engine(engine, address, gpus_per_worker)
    get_preprocessor(preprocessor, **params)  # a bad name or parameter fails before anything is written
    output = Path(output)
    if is_shard_source(source):
        tasks = plan_shards(source, output, preprocessor, params)
    else:
        tasks = plan_folder(Path(source), output, preprocessor, params, shard_size, caption_from)
    remove_stale_temporaries(check_output_folder(output, "output"))
    index = ShardIndex(output, preprocessor, params)
    report = ShardReport(index=index.path)
    todo = []
    for task in tasks:
        done = None if overwrite else index.done(task)
        (report.add(task, done, skipped=True) if done is not None else todo.append(task))
    stopped: list[str] = []
    results = _run(todo, preprocessor, params, workers, engine, address, gpus_per_worker, lambda: bool(stopped))
    if progress:
        from preprocessors.batch import progress_bar

        results = progress_bar(results, len(todo))
    finished: set[int] = set()
    for position, outcome in results:
        task = todo[position]
        finished.add(position)
        if outcome.get("output_error"):
            stopped.append(outcome["output_error"])
            continue
        report.add(task, outcome)
        if not outcome.get("incomplete"):  # a shard whose worker died is written again by the next run
            index.record(task, outcome)
    index.write()
    if engine == "ray":  # what killed (and retried) Ray workers left
        remove_stale_temporaries(output)
    report.stopped = stopped[0] if stopped else None
    report.not_started = [task.url for position, task in enumerate(todo) if position not in finished]
    return report


class ShardIndex:
    """`OUTPUT/shards.json`: the finished shards with their counts, plan digests and reports, in shard order."""

    def __init__(self, folder: Path, preprocessor: str, params: dict[str, Any]):
        from training.data.shards import INDEX

        self.path = folder / INDEX
        self.preprocessor, self.params = preprocessor, params
        self.entries: dict[str, dict[str, Any]] = {}
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries = {entry["url"]: entry for entry in record["shards"]}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no index yet (or not ours): every shard is written

    def done(self, task: ShardTask) -> dict[str, Any] | None:
        entry = self.entries.get(task.url)
        exists = (self.path.parent / task.url).is_file()
        return entry if entry is not None and entry.get("plan") == task.plan and exists else None

    def record(self, task: ShardTask, outcome: dict[str, Any]) -> None:
        self.entries[task.url] = {"url": task.url, "plan": task.plan, **{
            name: outcome[name] for name in ("samples", "failed", "empty", "uncaptioned")}}
        self.write()

    def write(self) -> None:
        from controlkit.files import write_bytes_atomic
        from training.data.shards import INDEX_FORMAT

        shards = [self.entries[url] for url in sorted(self.entries)]
        record = {"format": INDEX_FORMAT, "version": 1, "preprocessor": self.preprocessor, "params": self.params,
                  "samples": sum(entry["samples"] for entry in shards), "shards": shards}
        write_bytes_atomic(self.path, (json.dumps(record, indent=1, default=str) + "\n").encode("utf-8"))


def _run(tasks: list[ShardTask], name: str, params: dict[str, Any], workers: int, engine: str,
         address: str | None, gpus: float, stop: Callable[[], bool]) -> Iterator[tuple[int, dict[str, Any]]]:
    from preprocessors.batch import worker_threads
    from preprocessors.workers import Failure, run_in_processes

    if engine == "ray":
        yield from _run_on_ray(tasks, name, params, workers, address, gpus, stop)
        return
    if workers <= 1 or len(tasks) <= 1:
        annotator = _annotator(name, params, worker_threads(1))
        for position, task in enumerate(tasks):
            if stop():
                return
            yield position, write_shard(annotator, task)
        return
    results = run_in_processes(_write_in_worker, tasks, workers=workers, initializer=_init_worker,
                               initargs=(name, params, worker_threads(workers)), stop=stop)
    for position, outcome in results:
        if isinstance(outcome, Failure):  # its worker died: the whole shard is that failure, and not indexed
            outcome = {"samples": 0, "failed": [[tasks[position].url, f"{tasks[position].url}: {outcome.reason}"]],
                       "empty": [], "uncaptioned": [], "incomplete": True}
        yield position, outcome


def _run_on_ray(tasks: list[ShardTask], name: str, params: dict[str, Any], workers: int, address: str | None,
                gpus: float, stop: Callable[[], bool]) -> Iterator[tuple[int, dict[str, Any]]]:
    from preprocessors.ray_engine import map_on_actors, ray_session

    rows = [{"index": position, "task": json.dumps(task.to_dict())} for position, task in enumerate(tasks)]
    if not rows:  # every shard is there already: no cluster to start
        return
    with ray_session(address, workers, gpus):
        threads = max(1, (os.cpu_count() or 1) // workers)
        results = map_on_actors(rows, ShardActor, (name, params, threads, gpus > 0), workers=workers,
                                gpus_per_worker=gpus, batch=1, stop=stop)
        for position, row in results:
            yield position, json.loads(row["outcome"])


_WORKER_ANNOTATOR: Any = None


def _init_worker(name: str, params: dict[str, Any], threads: int) -> None:
    global _WORKER_ANNOTATOR
    _WORKER_ANNOTATOR = _annotator(name, params, threads)


def _write_in_worker(task: ShardTask) -> dict[str, Any]:
    return write_shard(_WORKER_ANNOTATOR, task)


def _annotator(name: str, params: dict[str, Any], threads: int) -> Any:
    from preprocessors.batch import worker_annotator

    return worker_annotator(name, params, threads)


class ShardActor:
    """One preprocessor per Ray actor; each call writes the shards of its batch (`write_shard`)."""

    def __init__(self, name: str, params: dict[str, Any], threads: int, on_gpu: bool) -> None:
        self.annotator = _annotator(name, params, threads)
        if on_gpu:
            self.annotator = self.annotator.to("cuda")

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        outcomes = [json.dumps(write_shard(self.annotator, ShardTask.from_dict(json.loads(text))))
                    for text in batch["task"]]
        return {"index": batch["index"], "outcome": outcomes}


def write_shard(annotator: Any, task: ShardTask) -> dict[str, Any]:
    """Annotate every sample of `task` and write its shard atomically; never raises for a bad sample.

    Returns:
        {"samples": written, "failed": [[name, reason]], "empty": [[name, reason]], "uncaptioned": [name],
        "output_error": the reason the shard could not be written, or ""}.
    """
    from controlkit.files import atomic_path
    from training.data.shards import webdataset_module

    TarWriter = webdataset_module().TarWriter
    outcome: dict[str, Any] = {"samples": 0, "failed": [], "empty": [], "uncaptioned": [], "output_error": ""}
    try:
        with atomic_path(task.output) as temporary, open(temporary, "wb") as stream:
            with TarWriter(stream, encoder=False, **TAR_OPTIONS) as writer:
                try:
                    for sample in task.samples():
                        _write_sample(annotator, task, sample, writer, outcome)
                except OutputError:
                    raise
                except ControlkitError as error:  # the input shard broke part-way: what came before is kept
                    outcome["failed"].append([task.url, str(error)])
    except OutputError as error:
        outcome["output_error"] = str(error)
    return outcome


def _write_sample(annotator: Any, task: ShardTask, sample: dict[str, Any], writer: Any,
                  outcome: dict[str, Any]) -> None:
    """Decode, annotate and write one sample; a bad one goes to outcome["failed"] and is left out."""
    from controlkit.image import load_image

    name = sample["name"]
    if sample.get("problem"):
        outcome["failed"].append([name, f"{name}: {sample['problem']}"])
        return
    try:
        image = load_image(sample["image"])
        condition, empty = _annotate(annotator, image)
        keypoints = annotator.keypoints(image) if hasattr(annotator, "keypoints") else None
    except ControlkitError as error:
        outcome["failed"].append([name, _named(str(error), name)])
        return
    except MemoryError:
        outcome["failed"].append([name, f"{name}: not enough memory to annotate it"])
        return
    except Exception as error:  # a detector's own failure on this input: the others go on
        outcome["failed"].append([name, f"{name}: the preprocessor failed on it ({type(error).__name__}: "
                                        f"{first_line(error)})"])
        return
    record = {"key": sample["key"], "source": name, "image": [image.shape[1], image.shape[0]],
              "condition": list(condition.size), "preprocessor": task.preprocessor, "params": task.params}
    if sample.get("original") is not None:
        record["original"] = sample["original"]
    fields = {"__key__": sample["key"], sample["field"]: sample["image"], "condition.png": _png(condition),
              "txt": sample["caption"].encode("utf-8"), "json": json.dumps(record, default=str).encode("utf-8")}
    if keypoints is not None:
        fields["keypoints.json"] = json.dumps(keypoints).encode("utf-8")
    writer.write(fields)
    outcome["samples"] += 1
    if empty:
        outcome["empty"].append([name, empty])
    if not sample["caption"]:
        outcome["uncaptioned"].append(name)


def _annotate(annotator: Any, image: Any) -> tuple[Any, str | None]:
    """The map of one decoded image, and why it is empty (the detector found nothing), as batch annotation."""
    from preprocessors.jobs import with_empty_reason

    return with_empty_reason(annotator, image)


def _png(image: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # the encoder and settings of folder maps: the same bytes
    return buffer.getvalue()


def _named(message: str, name: str) -> str:
    for anonymous in ("<bytes>", "<array>"):
        message = message.replace(anonymous, name, 1)
    return message if name in message else f"{name}: {message}"


def pack_pairs(pairs: Any, output: str | os.PathLike, *, shard_size: int = SHARD_SIZE) -> Path:
    """Write pairs that already have their condition maps (from `load_pairs`) into shards in `output`, with
    their index, in their order (keys 000000000, ...): e.g. a manifest dataset for streaming. Image bytes are
    copied as they are; maps are stored as PNG (copied when they are PNG files). Returns the index path.

    Raises:
        ControlkitError: a pair without a condition map, or a file that cannot be read (naming the pair).
    """
    import io

    from PIL import Image

    from controlkit.files import atomic_path
    from training.data.shard_plan import FIELDS
    from training.data.shards import webdataset_module

    TarWriter = webdataset_module().TarWriter
    output = Path(output)
    index = ShardIndex(output, "", {})
    chunk: list[Any] = []
    for number, pair in enumerate([*pairs, None]):
        if pair is not None:
            chunk.append((number, pair))
        if chunk and (pair is None or len(chunk) == shard_size):
            url = f"pairs-{len(index.entries):06d}.tar"
            with atomic_path(output / url) as temporary, open(temporary, "wb") as stream:
                with TarWriter(stream, encoder=False, **TAR_OPTIONS) as writer:
                    for key, item in chunk:
                        if item.condition is None:
                            raise ControlkitError(f"{item.key}: no condition map to pack")
                        image, condition = _file_bytes(item.image, item.key), _file_bytes(item.condition, item.key)
                        if not condition.startswith(b"\x89PNG"):
                            buffer = io.BytesIO()
                            Image.open(io.BytesIO(condition)).convert("RGB").save(buffer, format="PNG")
                            condition = buffer.getvalue()
                        field_name = FIELDS.get(Path(str(item.image)).suffix.lower(), "png")
                        writer.write({"__key__": f"{key:09d}", field_name: image, "condition.png": condition,
                                      "txt": item.prompt.encode("utf-8"),
                                      "json": json.dumps({"key": f"{key:09d}", "source": item.key}).encode()})
            index.entries[url] = {"url": url, "plan": "", "samples": len(chunk), "failed": [], "empty": [],
                                  "uncaptioned": []}
            chunk = []
    index.write()
    return index.path


def _file_bytes(reference: Any, key: str) -> bytes:
    if isinstance(reference, (bytes, bytearray)):
        return bytes(reference)
    try:
        return Path(reference).read_bytes()
    except (OSError, TypeError) as error:
        raise ControlkitError(f"{key}: {reference} cannot be read ({first_line(error)})") from None
