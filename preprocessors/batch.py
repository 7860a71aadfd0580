"""Annotating many images: files and folders in, lossless PNG maps out, resumable, in several processes.

The same engine serves the Python API (`annotate_paths`) and `controlkit annotate`. Outputs are written
atomically (temporary file, then rename), so an interrupted run never leaves a half-written map, and a re-run
skips every map that already exists: it resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlkit.errors import ControlkitError
from controlkit.files import atomic_path, write_bytes_atomic
from controlkit.image import is_image_file


@dataclass(frozen=True)
class Job:
    """One input file and the map (and optional keypoints JSON) it becomes."""

    source: Path
    output: Path
    keypoints: Path | None = None


@dataclass
class AnnotateReport:
    """What a batch run did: written, skipped (already there), failed (path, reason)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def plan_jobs(inputs: Sequence[str | os.PathLike], output_dir: Path, *, keypoints: bool = False) -> list[Job]:
    """Map inputs to output paths.

    Files map to `output_dir/<stem>.png`; folders are searched recursively for image files and keep their
    relative layout under `output_dir`. Two inputs that would share an output name keep their suffix
    (`a.jpg.png`, `a.webp.png`), so no map overwrites another.

    Raises:
        ControlkitError: an input that does not exist, or no image found at all.
    """
    pairs: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            pairs += [(p, p.relative_to(path).parent) for p in found]
        elif path.exists():
            pairs.append((path, Path()))
        else:
            raise ControlkitError(f"{path}: no such file or folder")
    if not pairs:
        raise ControlkitError(f"no image files ({', '.join(_suffixes())}) found in {', '.join(map(str, inputs))}")
    stems: dict[Path, int] = {}
    for source, relative in pairs:
        stems[relative / source.stem] = stems.get(relative / source.stem, 0) + 1
    jobs = []
    for source, relative in pairs:
        name = source.stem if stems[relative / source.stem] == 1 else source.name
        output = output_dir / relative / f"{name}.png"
        jobs.append(Job(source, output, output.with_suffix(".json") if keypoints else None))
    return jobs


def annotate_paths(
    inputs: Sequence[str | os.PathLike],
    preprocessor: str,
    output_dir: str | os.PathLike,
    *,
    params: dict[str, Any] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    keypoints: bool = False,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None,
) -> AnnotateReport:
    """Annotate files and folders with one registry preprocessor.

    Args:
        inputs: image files and folders (searched recursively).
        preprocessor: registry name, e.g. "canny".
        output_dir: where the PNG maps go (created).
        params: keyword parameters of the preprocessor.
        workers: processes; each builds the preprocessor once.
        overwrite: recompute maps that already exist (default: skip them, which resumes a stopped run).
        keypoints: also write OpenPose JSON next to each map (preprocessors with a `keypoints` method).
        progress: wraps the stream of finished jobs: `progress_bar`, or e.g. `lambda it, n: tqdm(it, total=n)`.

    Returns:
        An `AnnotateReport`; a bad input is recorded in `failed` and the others are still written.
    """
    from preprocessors.registry import get_preprocessor

    params = dict(params or {})
    annotator = get_preprocessor(preprocessor, **params)  # validates the name and parameters up front
    if keypoints and not hasattr(annotator, "keypoints"):
        raise ControlkitError(f"--json needs keypoints, which preprocessor '{preprocessor}' does not produce")
    report = AnnotateReport()
    jobs = []
    for job in plan_jobs(inputs, Path(output_dir), keypoints=keypoints):
        done = job.output.exists() and (job.keypoints is None or job.keypoints.exists())
        (report.skipped.append(job.output) if done and not overwrite else jobs.append(job))
    results = _run(jobs, preprocessor, params, annotator, workers)
    for job, error in progress(results, len(jobs)) if progress else results:
        report.failed.append((job.source, error)) if error else report.written.append(job.output)
    return report


def progress_bar(results: Iterable[Any], total: int) -> Iterable[Any]:
    """A progress bar on stderr over `total` finished jobs: the `progress` of `annotate_paths` on a terminal."""
    import sys

    from tqdm import tqdm

    return tqdm(results, total=total, unit="img", file=sys.stderr, disable=total == 0)


def _run(jobs: list[Job], name: str, params: dict[str, Any], annotator: Any, workers: int) -> Iterable:
    if workers <= 1 or len(jobs) <= 1:
        return ((job, _annotate_one(annotator, job)) for job in jobs)
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // workers)
    executor = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),  # fork after torch/mediapipe start is unsafe
        initializer=_init_worker,
        initargs=(name, params, threads),
    )
    return _ordered(executor, jobs, workers)


def _ordered(executor: ProcessPoolExecutor, jobs: list[Job], workers: int) -> Iterable:
    # Jobs go out in chunks (fewer round trips between processes) and come back in input order.
    chunk = max(1, min(16, len(jobs) // (8 * workers)))
    with executor:
        yield from zip(jobs, executor.map(_worker_annotate, jobs, chunksize=chunk))


_WORKER_ANNOTATOR: Any = None


def _init_worker(name: str, params: dict[str, Any], threads: int) -> None:
    """Build the preprocessor once per worker, with `threads` math threads so workers do not oversubscribe.

    The thread count goes into the environment before anything heavy is imported, so classical preprocessors
    never pay for importing torch.
    """
    global _WORKER_ANNOTATOR
    import sys

    import cv2

    os.environ["OMP_NUM_THREADS"] = str(threads)
    cv2.setNumThreads(threads)
    from preprocessors.registry import get_preprocessor

    _WORKER_ANNOTATOR = get_preprocessor(name, **params)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def _worker_annotate(job: Job) -> str | None:
    return _annotate_one(_WORKER_ANNOTATOR, job)


def _annotate_one(annotator: Any, job: Job) -> str | None:
    """Write one map; returns None, or the reason the input failed (a user error, never a crash)."""
    try:
        condition = annotator(job.source)
        job.output.parent.mkdir(parents=True, exist_ok=True)
        if job.keypoints is not None:
            write_bytes_atomic(job.keypoints, json.dumps(annotator.keypoints(job.source)).encode())
        with atomic_path(job.output) as temporary:
            condition.save(temporary, format="PNG")
    except ControlkitError as error:
        return str(error)
    except OSError as error:
        return f"{job.output}: cannot write ({error.strerror or error})"
    return None


def _suffixes() -> list[str]:
    from controlkit.image import IMAGE_SUFFIXES

    return list(IMAGE_SUFFIXES)
