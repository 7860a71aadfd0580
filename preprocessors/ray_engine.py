"""The Ray engine of folder annotation: the same jobs, rules and maps as the local engine, as a Ray Data pipeline.

    >>> from preprocessors.batch import annotate_paths
    >>> annotate_paths(["photos/"], "canny", "maps/", workers=8, engine="ray", address="auto")

`preprocessors.batch` plans the jobs (where each map goes, which already exist, the output checked) exactly as
for the local engine; this module only runs them:

    from_items(jobs)                 the planned jobs, a few per block
      .map_batches(decode_images)    read and decode each input through `controlkit.image.load_image`
      .map_batches(Annotator, concurrency=workers, num_gpus=...)
                                     one preprocessor per actor: annotate, write the map atomically
      .iter_rows()                   each job's outcome, streamed back as it finishes

Ray fuses the decode stage into the actors (a task stage before an actor stage), so `workers` actors are all
the parallelism, as `workers` processes are for the local engine. Decoding goes through `load_image(path)`, so
the pixels, the error lines and the size checks are the local engine's, and so are the maps (bitwise).

Faults: Ray restarts a killed actor and retries its batch (Ray Data's fault tolerance). Maps are written
through `controlkit.files.atomic_path` under their planned names, so a retried batch rewrites the same files
whole: nothing is half-written or duplicated, outcomes are counted once per job, and the temporary files of
killed workers are removed when the run ends. Unlike the local engine, where a worker killed on a file is that
file's failure, a Ray batch is retried until it completes: an input that kills every worker that takes it
(bounded by the pixel cap of `load_image`) keeps the run from ending; stop it, remove that file, and re-run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from controlkit.errors import ConfigError, ControlkitError, MissingDependencyError, first_line

#: Jobs per block and per actor call: enough to hide Ray's per-task overhead, few enough to balance the actors.
BATCH = 4


def import_ray() -> Any:
    """The `ray` module with Ray Data.

    Raises:
        MissingDependencyError: Ray is not installed (one line with the install command).
    """
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is an extra of ray)
    except ImportError:
        raise MissingDependencyError("the Ray engine needs Ray Data: pip install controlkit[ray] "
                                     "(or leave out --engine ray to use the local engine)") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None, workers: int, gpus_per_worker: float = 0.0) -> Iterator[Any]:
    """Ray, joined or started for the block.

    `address` None: the cluster this process already joined, else a local Ray with this machine's cores (and
    at least one per worker), shut down after the block. An address ("auto", "ray://host:10001", "host:6379"):
    that cluster, left running. The cluster must hold the actors: `workers` CPUs and
    `workers x gpus_per_worker` GPUs.

    Raises:
        ConfigError: the cluster cannot be reached, or is too small for the actors.
    """
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        options: dict[str, Any] = {"logging_level": logging.WARNING, "include_dashboard": False}
        if address is None:
            options["num_cpus"] = max(os.cpu_count() or 1, workers)
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ConfigError(f"--address {address}: no Ray cluster could be joined ({first_line(error)}); start "
                              "one with `ray start --head`, or leave out --address for a local Ray") from None
        started = True
    try:
        _check_capacity(ray.cluster_resources(), workers, gpus_per_worker)
        yield ray
    finally:
        if started:
            ray.shutdown()


def _check_capacity(resources: dict[str, float], workers: int, gpus_per_worker: float) -> None:
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if cpus < workers:
        raise ConfigError(f"--workers {workers}: the Ray cluster has {cpus:g} CPUs, one per worker is needed; "
                          "lower --workers or add nodes")
    if gpus_per_worker and gpus < workers * gpus_per_worker:
        raise ConfigError(f"--workers {workers} x --gpus-per-worker {gpus_per_worker:g}: the Ray cluster has "
                          f"{gpus:g} GPUs; lower them or add GPU nodes")


def map_on_actors(
    rows: Sequence[dict[str, Any]],
    actor: type,
    constructor: tuple,
    *,
    workers: int,
    gpus_per_worker: float = 0.0,
    batch: int = BATCH,
    before: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Run `actor(*constructor)` on `workers` Ray actors over `rows` (each with an "index"), in a running Ray.

    Args:
        rows: one dict per item; "index" is its position in `rows`.
        actor: a callable class (module level): `__call__(batch of columns) -> batch with an "index" column`.
        before: a task stage before the actors (CPU actors: fused into them by Ray), e.g. reading and decoding.
        stop: asked after each outcome; once true, no further outcome is taken.

    Yields:
        (index, the actor's row for it) once per item, in any order, as outcomes arrive.

    Raises:
        ControlkitError: the pipeline itself failed (not one item: those are rows); what was written stays.
    """
    import ray

    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars
    context.enable_progress_bars = False  # the caller shows one progress bar over the outcomes
    seen: set[int] = set()
    try:
        for row in _pipeline(ray, list(rows), actor, constructor, workers, gpus_per_worker, batch, before):
            index = int(row["index"])
            if index not in seen:  # a retried batch may report an item twice
                seen.add(index)
                yield index, row
                if stop():
                    return
    except ControlkitError:
        raise
    except Exception as error:  # a Ray system failure, not one input's: one line, and a re-run resumes
        raise ControlkitError(f"the Ray pipeline failed after {len(seen)} of {len(rows)} items "
                              f"({type(error).__name__}: {first_line(error)}); what was written is kept: run "
                              "the same command again to resume") from None
    finally:
        context.enable_progress_bars = saved


def _pipeline(ray: Any, rows: list[dict[str, Any]], actor: type, constructor: tuple, workers: int,
              gpus_per_worker: float, batch: int, before: Callable | None) -> Iterator[dict[str, Any]]:
    import warnings

    # Ray Data's own fault tolerance: a killed actor is restarted and its batch retried.
    batch = max(1, min(batch, -(-len(rows) // workers)))  # a few inputs still reach every actor
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch)))
    if before is not None:
        # num_cpus as the actors' so that Ray fuses this stage into CPU actors (they hold every CPU: a separate
        # task stage would wait for one forever); beside GPU actors it runs as CPU tasks feeding them.
        dataset = dataset.map_batches(before, batch_size=batch, num_cpus=1)
    dataset = dataset.map_batches(actor, fn_constructor_args=constructor, batch_size=batch, num_cpus=1,
                                  compute=ray.data.ActorPoolStrategy(size=workers),
                                  num_gpus=gpus_per_worker or None)
    yield from dataset.iter_rows()


def annotate_on_ray(
    jobs: Sequence[Any], name: str, params: dict[str, Any], *, workers: int, address: str | None,
    gpus_per_worker: float, stop: Callable[[], bool],
) -> Iterator[tuple[int, Any]]:
    """`preprocessors.batch`'s jobs on Ray: (index of the job, its `Outcome` or `Failure`), as they finish."""
    from preprocessors.jobs import Outcome

    rows = [_job_row(index, job) for index, job in enumerate(jobs)]
    if not rows:  # every map is there already: no cluster to start
        return
    with ray_session(address, workers, gpus_per_worker):
        threads = _threads_per_actor(workers)
        results = map_on_actors(rows, Annotator, (name, params, threads, gpus_per_worker > 0), workers=workers,
                                gpus_per_worker=gpus_per_worker, before=decode_images, stop=stop)
        for index, row in results:
            named = _local_names(rows[index], jobs[index])
            yield index, Outcome(error=named(row["error"]) or None, output_error=bool(row["output_error"]),
                                 empty=row["empty"] or None)


def _job_row(index: int, job: Any) -> dict[str, Any]:
    """A job as absolute paths: Ray workers do not share this process's working folder."""
    keypoints = os.path.abspath(job.keypoints) if job.keypoints is not None else ""
    return {"index": index, "source": os.path.abspath(job.source), "output": os.path.abspath(job.output),
            "keypoints": keypoints}


def _local_names(row: dict[str, Any], job: Any) -> Callable[[str], str]:
    """Messages name the inputs and maps as the user gave them, not as the absolute paths the workers saw."""
    def named(message: str) -> str:
        return message.replace(row["source"], str(job.source)).replace(row["output"], str(job.output))

    return named


def _threads_per_actor(workers: int) -> int:
    """The local engine's rule (cores shared out) on the smallest node that can host an actor."""
    import ray

    cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    per_node = int(min((cpu for cpu in cpus if cpu >= 1), default=1))
    return max(1, per_node // max(1, min(workers, per_node)))


def decode_images(batch: dict[str, Any]) -> dict[str, Any]:
    """The read and decode stage: each source through `load_image(path)` ((H, W, 3) uint8 RGB), as its raw
    pixels and shape (Arrow carries them as bytes), or its one-line error."""
    from controlkit.errors import ControlkitError
    from controlkit.image import load_image

    pixels, shapes, errors = [], [], []
    for source in batch["source"]:
        try:
            image = load_image(source)
            pixels.append(image.tobytes())
            shapes.append(list(image.shape))
            errors.append("")
        except ControlkitError as error:
            pixels.append(b"")
            shapes.append([0, 0, 3])
            errors.append(str(error))
    return {**batch, "pixels": pixels, "shape": shapes, "decode_error": errors}


class Annotator:
    """One preprocessor per Ray actor: annotates decoded images and writes their maps (and keypoints) atomically
    through `preprocessors.jobs.annotate_job`, the local engine's own function."""

    def __init__(self, name: str, params: dict[str, Any], threads: int, on_gpu: bool) -> None:
        from preprocessors.jobs import worker_annotator

        self.annotator = worker_annotator(name, params, threads)
        if on_gpu:
            self.annotator = self.annotator.to("cuda")

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from preprocessors.jobs import Job, annotate_job

        errors, output_errors, empty = [], [], []
        for position, source in enumerate(batch["source"]):
            keypoints = batch["keypoints"][position]
            job = Job(Path(source), Path(batch["output"][position]), Path(keypoints) if keypoints else None)
            if batch["decode_error"][position]:
                outcome_error, output_error, reason = batch["decode_error"][position], False, ""
            else:
                shape = tuple(int(side) for side in batch["shape"][position])
                image = np.frombuffer(batch["pixels"][position], dtype=np.uint8).reshape(shape).copy()  # writable
                outcome = annotate_job(self.annotator, job, image)
                outcome_error, output_error, reason = outcome.error or "", outcome.output_error, outcome.empty or ""
            errors.append(outcome_error)
            output_errors.append(output_error)
            empty.append(reason)
        return {"index": batch["index"], "error": errors, "output_error": output_errors, "empty": empty}
