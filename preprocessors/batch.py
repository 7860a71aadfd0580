"""Annotating many images: files and folders in, lossless PNG maps out, resumable, in several processes.

The same engine serves the Python API (`annotate_paths`), `controlkit annotate` and `dataset build`.

- Where maps go (`plan_annotation`): each input keeps its path relative to the folder that holds all the inputs
  (one folder: its own layout; files of one folder: flat), so same-named files of two folders never share a map.
  An output folder inside an input folder is not searched, and no map may overwrite an input.
- Nothing done is lost: the output folder is checked before any work, maps are written atomically, temporary
  files of killed runs are removed at the start, and a re-run skips the maps that exist (it resumes). A map that
  cannot be written (a full disk) stops the run: every later map would fail too; what was done is reported.
- One bad input never stops the others: an unreadable image, a missing input path or a worker killed while on a
  file (the out-of-memory killer) is that input's one-line failure; the rest is written.
- Maps that are empty because the detector found nothing (pose: no person) are written and listed in `empty`.

Two engines run the same jobs with the same rules and give the same maps: "local" (worker processes on this
machine, preprocessors/workers.py) and "ray" (a Ray Data pipeline on a local or joined Ray cluster,
preprocessors/ray_engine.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlkit.errors import ControlkitError
from controlkit.files import check_output_folder, remove_stale_temporaries
from controlkit.image import is_image_file
from preprocessors.jobs import Job, Outcome, annotate_job, worker_annotator, worker_threads
from preprocessors.workers import Failure, run_in_processes

__all__ = ["ENGINES", "AnnotateReport", "Job", "Outcome", "annotate_job", "annotate_paths", "check_engine",
           "image_files", "plan_annotation", "plan_jobs", "progress_bar", "worker_annotator", "worker_threads"]


#: Engines that run the jobs: worker processes here, or a Ray Data pipeline (`pip install controlkit[ray]`).
ENGINES = ("local", "ray")


@dataclass
class AnnotateReport:
    """What a batch run did.

    Attributes:
        written: maps written. skipped: maps already there (not recomputed).
        failed: (input, one-line reason) of each input that got no map.
        empty: (map, reason) of written maps that are empty because nothing was found (pose: no person).
        stopped: why the run stopped early (a map could not be written), else None.
        not_started: inputs not annotated because the run stopped; a re-run does them.
    """

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    empty: list[tuple[Path, str]] = field(default_factory=list)
    stopped: str | None = None
    not_started: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and self.stopped is None


def plan_annotation(
    inputs: Sequence[str | os.PathLike], output_dir: str | os.PathLike, *, keypoints: bool = False
) -> tuple[list[Job], list[tuple[Path, str]]]:
    """Map inputs to output paths; returns (jobs, (input, one-line reason) of inputs that do not exist and of
    folders that cannot be read).

    Each output is `output_dir / <the input's path relative to the folder holding all inputs>` with the suffix
    .png: one folder keeps its layout, files of one folder give flat names, two folders keep their names. Files
    that would share a name (`a.jpg`, `a.png`) keep their suffix (`a.jpg.png`, `a.png.png`). Folders are searched
    recursively for image files (following links to folders, each folder once), skipping `output_dir` where it
    lies inside them.

    Raises:
        ControlkitError: no image found at all, or two inputs (or an input and a map) would share a path.
    """
    output_dir = Path(output_dir)
    found, problems, roots = _find_sources(inputs, output_dir)
    if not found:
        if problems:
            raise ControlkitError(problems[0][1] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        raise ControlkitError(f"no image files ({', '.join(_suffixes())}) found in {', '.join(map(str, inputs))}")
    base = Path(os.path.commonpath(roots)) if roots else Path()
    relative = [Path(os.path.relpath(os.path.abspath(source), base)) for source in found]
    stems: dict[Path, int] = {}
    for path in relative:
        stems[path.with_suffix("")] = stems.get(path.with_suffix(""), 0) + 1
    jobs = []
    for source, path in zip(found, relative):
        name = path.stem if stems[path.with_suffix("")] == 1 else path.name
        output = output_dir / path.parent / f"{name}.png"
        jobs.append(Job(source, output, output.with_suffix(".json") if keypoints else None))
    _check_distinct(jobs)
    return jobs, problems


def plan_jobs(inputs: Sequence[str | os.PathLike], output_dir: Path, *, keypoints: bool = False) -> list[Job]:
    """`plan_annotation`'s jobs; an input that does not exist (or a folder that cannot be read) is an error
    (ControlkitError)."""
    jobs, problems = plan_annotation(inputs, output_dir, keypoints=keypoints)
    if problems:
        raise ControlkitError(problems[0][1])
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
    engine: str = "local",
    address: str | None = None,
    gpus_per_worker: float = 0.0,
) -> AnnotateReport:
    """Annotate files and folders with one registry preprocessor.

    Args:
        inputs: image files and folders (searched recursively).
        preprocessor: registry name, e.g. "canny".
        output_dir: where the PNG maps go (created; checked before any work).
        params: keyword parameters of the preprocessor.
        workers: processes; each builds the preprocessor once. They end with this process, however it ends.
        overwrite: recompute maps that already exist (default: skip them, which resumes a stopped run).
        keypoints: also write OpenPose JSON next to each map (preprocessors with a `keypoints` method).
        progress: wraps the stream of finished jobs: `progress_bar`, or e.g. `lambda it, n: tqdm(it, total=n)`.
        engine: "local" (worker processes here) or "ray" (a Ray Data pipeline, one preprocessor per actor;
            `workers` actors).
        address: the Ray cluster to join ("auto": the one running here; None: use the one this process
            already joined, else start a local Ray that stops with the call). Ray engine only.
        gpus_per_worker: GPUs each Ray actor reserves (fractions share a GPU); its preprocessor runs on CUDA.

    Returns:
        An `AnnotateReport`; a bad or missing input is recorded in `failed` and the others are still written.

    Raises:
        ValueError: unknown preprocessor or parameter (before anything is written).
        OutputError: `output_dir` cannot be written.
        ControlkitError: no input found, or inputs whose maps would collide.
    """
    from preprocessors.registry import get_preprocessor

    params = dict(params or {})
    check_engine(engine, address, gpus_per_worker)
    annotator = get_preprocessor(preprocessor, **params)  # validates the name and parameters up front
    if keypoints and not hasattr(annotator, "keypoints"):
        raise ControlkitError(f"--json needs keypoints, which preprocessor '{preprocessor}' does not produce")
    planned, problems = plan_annotation(inputs, output_dir, keypoints=keypoints)
    remove_stale_temporaries(check_output_folder(output_dir, "output folder"))
    report = AnnotateReport(failed=list(problems))
    jobs = []
    for job in planned:
        done = job.output.exists() and (job.keypoints is None or job.keypoints.exists())
        (report.skipped.append(job.output) if done and not overwrite else jobs.append(job))
    outcomes: dict[int, Any] = {}
    stopped: list[str] = []  # the first map that could not be written: no new job starts after it
    if engine == "ray":
        from preprocessors.ray_engine import annotate_on_ray

        results = annotate_on_ray(jobs, preprocessor, params, workers=workers, address=address,
                                  gpus_per_worker=gpus_per_worker, stop=lambda: bool(stopped))
    else:
        results = _run(jobs, preprocessor, params, annotator, workers, stop=lambda: bool(stopped))
    for index, outcome in progress(results, len(jobs)) if progress else results:
        outcomes[index] = outcome
        if isinstance(outcome, Outcome) and outcome.output_error and not stopped:
            stopped.append(outcome.error)
    if engine == "ray":  # what killed (and retried) Ray workers left: their process ids are gone now
        remove_stale_temporaries(output_dir)
    for index, job in enumerate(jobs):
        if index in outcomes:
            _record(report, job, outcomes[index])
        else:
            report.not_started.append(job.source)
    report.stopped = stopped[0] if stopped else None
    return report


def check_engine(engine: str, address: str | None, gpus_per_worker: float) -> None:
    """Refuse engine options that do not go together, before any work.

    Raises:
        ControlkitError: an unknown engine, or --address / --gpus-per-worker without the Ray engine.
    """
    if engine not in ENGINES:
        raise ControlkitError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "ray" and (address is not None or gpus_per_worker):
        raise ControlkitError("--address and --gpus-per-worker need --engine ray (the local engine runs worker "
                              "processes on this machine)")
    if not gpus_per_worker >= 0:
        raise ControlkitError(f"--gpus-per-worker must be 0 or positive, got {gpus_per_worker}")


def progress_bar(results: Iterable[Any], total: int) -> Iterable[Any]:
    """A progress bar on stderr over `total` finished jobs: the `progress` of `annotate_paths` on a terminal."""
    import sys

    from tqdm import tqdm

    return tqdm(results, total=total, unit="img", file=sys.stderr, disable=total == 0)


def _find_sources(
    inputs: Sequence[str | os.PathLike], output_dir: Path
) -> tuple[list[Path], list[tuple[Path, str]], list[str]]:
    """(image files, (input, reason) of problems, the folders that anchor the layout), without duplicates or
    the output folder."""
    output = os.path.realpath(output_dir)
    found: dict[str, Path] = {}
    problems: list[tuple[Path, str]] = []
    roots = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            if os.path.realpath(path) == output:
                raise ControlkitError(f"{path}: the output folder is this input folder, so its maps would be read "
                                      f"as inputs on the next run; choose another, e.g. {path / 'maps'}")
            roots.append(os.path.abspath(path))
            files = image_files(path, skip=output, problems=problems)
        elif path.exists():
            roots.append(os.path.dirname(os.path.abspath(path)))
            files = [path]
        else:
            problems.append((path, f"{path}: no such file or folder"))
            continue
        for file in files:
            found.setdefault(os.path.realpath(file), file)
    return list(found.values()), problems, roots


def image_files(folder: Path, *, skip: str | None = None, problems: list[tuple[Path, str]] | None = None,
                ) -> list[Path]:
    """Image files under `folder`, recursively, sorted by path: the one folder-search rule of annotation, dataset
    build and dataset check. Not descending into the folder `skip` (a real path, e.g. the output) nor twice into
    one folder (links); folders that cannot be listed go to `problems` (ignored when None)."""
    problems = [] if problems is None else problems
    def unreadable(error: OSError) -> None:
        problems.append((Path(error.filename), f"{error.filename}: folder cannot be read ({error.strerror})"))

    files, seen = [], {skip} if skip else set()
    for top, folders, names in os.walk(folder, onerror=unreadable, followlinks=True):
        seen.add(os.path.realpath(top))
        kept = [name for name in sorted(folders) if os.path.realpath(os.path.join(top, name)) not in seen]
        seen.update(os.path.realpath(os.path.join(top, name)) for name in kept)
        folders[:] = kept
        files += [Path(top, name) for name in names if is_image_file(Path(name))]
    return sorted(files)


def _check_distinct(jobs: list[Job]) -> None:
    """No two maps share a path and no map overwrites an input."""
    sources = {os.path.realpath(job.source): job.source for job in jobs}
    seen: dict[str, Path] = {}
    for job in jobs:
        target = os.path.realpath(job.output)
        if target in sources:
            raise ControlkitError(f"{sources[target]}: the map of {job.source} would overwrite this input; "
                                  "choose another output folder")
        if target in seen:
            raise ControlkitError(f"{seen[target]} and {job.source} would both be written to {job.output}; "
                                  "rename one, or annotate them into separate output folders")
        seen[target] = job.source


def _record(report: AnnotateReport, job: Job, outcome: Any) -> None:
    if isinstance(outcome, Failure):  # the worker died on it: the other jobs went on
        report.failed.append((job.source, f"{job.source}: {outcome.reason}"))
    elif outcome.error is None:
        report.written.append(job.output)
        if outcome.empty:
            report.empty.append((job.output, outcome.empty))
    else:
        report.failed.append((job.source, outcome.error))


def _run(jobs: list[Job], name: str, params: dict[str, Any], annotator: Any, workers: int,
         stop: Callable[[], bool]) -> Iterator[tuple[int, Any]]:
    if workers <= 1 or len(jobs) <= 1:
        for index, job in enumerate(jobs):
            if stop():
                return
            yield index, annotate_job(annotator, job)
        return
    yield from run_in_processes(_worker_annotate, jobs, workers=workers, initializer=_init_worker,
                                initargs=(name, params, worker_threads(workers)), stop=stop)


_WORKER_ANNOTATOR: Any = None


def _init_worker(name: str, params: dict[str, Any], threads: int) -> None:
    global _WORKER_ANNOTATOR
    _WORKER_ANNOTATOR = worker_annotator(name, params, threads)


def _worker_annotate(job: Job) -> Outcome:
    return annotate_job(_WORKER_ANNOTATOR, job)


def _suffixes() -> list[str]:
    from controlkit.image import IMAGE_SUFFIXES

    return list(IMAGE_SUFFIXES)
