"""One annotation job and what it gave, and the function every engine's worker runs on it.

`annotate_job` is the whole of what a worker does with one input, whichever engine runs it (a process of the
local engine, preprocessors/workers.py, or a Ray actor, preprocessors/ray_engine.py): annotate, then write the
map (and keypoints) through `controlkit.files.atomic_path`, so that a killed worker leaves nothing half-written
under a map's name. It never raises for a bad input or a failed write: it returns that job's `Outcome`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlkit.errors import ControlkitError, OutputError, first_line
from controlkit.files import atomic_path, write_bytes_atomic
from preprocessors.base import EmptyMapWarning


@dataclass(frozen=True)
class Job:
    """One input file and the map (and optional keypoints JSON) it becomes."""

    source: Path
    output: Path
    keypoints: Path | None = None


@dataclass(frozen=True)
class Outcome:
    """What annotating one job gave: `error` (one line) or None when the map was written; `output_error` when
    the map could not be written; `empty`, why a written map is empty (e.g. 'no person found (black map)')."""

    error: str | None = None
    output_error: bool = False
    empty: str | None = None


def worker_annotator(name: str, params: dict[str, Any], threads: int) -> Any:
    """The preprocessor of one worker (a process here, or a Ray actor), with `threads` math threads so that
    workers do not oversubscribe the cores.

    The thread count goes into the environment before anything heavy is imported, so classical preprocessors
    never pay for importing torch.
    """
    import sys

    import cv2

    os.environ["OMP_NUM_THREADS"] = str(threads)
    cv2.setNumThreads(threads)
    from preprocessors.registry import get_preprocessor

    annotator = get_preprocessor(name, **params)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return annotator


def worker_threads(workers: int) -> int:
    """Math threads per worker: this machine's cores shared out (at least one each)."""
    return max(1, (os.cpu_count() or 1) // workers)


def annotate_job(annotator: Any, job: Job, image: Any = None) -> Outcome:
    """Annotate one job and write its map (and keypoints) atomically; never raises for a bad input or a failed
    write. `image`: the job's source already decoded by `load_image` ((H, W, 3) uint8), else it is read here."""
    outcome, empty = with_empty_reason(_annotate, annotator, job, image)
    return outcome if outcome is not None else Outcome(empty=empty)


def with_empty_reason(function: Any, *args: Any) -> tuple[Any, str | None]:
    """`function(*args)` and why the map it made is empty (an `EmptyMapWarning` it raised: the detector found
    nothing), None when not; other warnings are shown as they would have been."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EmptyMapWarning)
        result = function(*args)
    empty = None
    for warning in caught:
        if isinstance(warning.message, EmptyMapWarning):
            empty = warning.message.reason
        else:  # not ours to judge: shown as it would have been
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return result, empty


def _annotate(annotator: Any, job: Job, image: Any = None) -> Outcome | None:
    source = job.source if image is None else image
    try:
        condition = annotator(source)
        if job.keypoints is not None:
            write_bytes_atomic(job.keypoints, json.dumps(annotator.keypoints(source)).encode())
        with atomic_path(job.output) as temporary:
            condition.save(temporary, format="PNG")
    except OutputError as error:
        return Outcome(error=str(error), output_error=True)
    except ControlkitError as error:
        # a decoded image is named '<array>' by the working-size checks: name the file instead
        return Outcome(error=_naming(job.source, str(error).replace("<array>", str(job.source), 1)))
    except MemoryError:
        return Outcome(error=f"{job.source}: not enough memory to annotate it")
    except Exception as error:  # a detector's own failure on this input: the others go on
        return Outcome(error=f"{job.source}: the preprocessor failed on it ({type(error).__name__}: "
                             f"{first_line(error)})")
    return None


def _naming(source: Path, message: str) -> str:
    return message if str(source) in message else f"{source}: {message}"
