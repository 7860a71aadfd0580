"""Worker processes that survive each other and die with their parent: the engine under `annotate --workers`.

Why not `concurrent.futures.ProcessPoolExecutor`: a worker that dies (the out-of-memory killer) breaks the whole
pool and fails every job in it, without saying which file it was on. Here the parent hands each worker one job
at a time over its own pipe, so it knows the job a dead worker was on: that job is reported as a `Failure`, a new
worker takes the dead one's place, and the other jobs go on.

Workers end with the parent, however it ends (kill -9 included): on Linux the kernel kills them when it dies
(`PR_SET_PDEATHSIG`), and everywhere a watchdog thread exits when the parent's process id changes. They ignore
Ctrl-C (the terminal sends it to the whole process group); the parent stops them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from controlkit.errors import ControlkitError, first_line

#: How often the watchdog looks at the parent's process id (seconds).
WATCH_INTERVAL = 0.2
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Failure:
    """A job that gave no result: its worker died on it, or the function raised. `reason` is one line."""

    reason: str


def run_in_processes(
    function: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[int, Any]]:
    """Run `function(item)` in `workers` spawned processes, one item at a time per process.

    Args:
        function, initializer: module-level functions (they are pickled by name); `initializer(*initargs)` runs
            once in each worker before its first item.
        stop: asked before each item is handed out; once true, no new item starts and the running ones finish.

    Yields:
        (index of the item, its result or a `Failure`) as items finish, in any order; items never started
        (after `stop`) are not yielded.

    Raises:
        ControlkitError: workers cannot start (the initializer fails or they keep dying before any item).
    """
    import multiprocessing

    pending = deque(enumerate(items))
    context = multiprocessing.get_context("spawn")  # fork after torch/mediapipe threads start is unsafe
    start = (function, initializer, initargs, os.getpid())
    pool = [_Worker(context, start) for _ in range(min(workers, len(pending)))]
    deaths_between_jobs = 0
    try:
        while pool:
            for worker in pool:
                if worker.ready and worker.job is None and pending and not stop():
                    worker.give(pending.popleft())
            _wait(pool)
            for worker in list(pool):
                yield from worker.results()
                if worker.process.exitcode is None:  # alive: done when idle with nothing left to give
                    if worker.ready and worker.job is None and (not pending or stop()):
                        worker.close()
                        pool.remove(worker)
                    continue
                pool.remove(worker)
                if worker.job is not None:
                    yield worker.job[0], Failure(f"the worker process died while on it ({_death(worker.process)})")
                else:
                    deaths_between_jobs += 1
                    if deaths_between_jobs > 2 * workers:
                        raise ControlkitError(f"worker processes keep dying between files ({_death(worker.process)}); "
                                              "use fewer --workers or free memory")
                if pending and not stop():
                    pool.append(_Worker(context, start))
    finally:
        for worker in pool:
            worker.kill()


class _Worker:
    """One spawned process and the parent's end of its pipe; `job` is the (index, item) it is on."""

    def __init__(self, context: Any, start: tuple) -> None:
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, *start), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.job: tuple[int, Any] | None = None

    def give(self, job: tuple[int, Any]) -> None:
        self.job = job
        try:
            self.connection.send(job)
        except OSError:
            pass  # it died: the sentinel says so and the job is reported

    def results(self) -> Iterator[tuple[int, Any]]:
        """Every message waiting on the pipe: a finished job is yielded; a failed start raises."""
        while self._readable():
            try:
                kind, payload = self.connection.recv()
            except (EOFError, OSError):
                self.process.join(5)  # the pipe closed: it died or is dying; its exit code says how
                return
            if kind == "ready":
                self.ready = True
            elif kind == "done":
                index, self.job = self.job[0], None
                yield index, payload
            else:
                raise ControlkitError(f"a worker process could not start: {payload}")

    def _readable(self) -> bool:
        try:
            return self.connection.poll()
        except (EOFError, OSError):
            return False

    def close(self) -> None:
        try:
            self.connection.send(None)
        except OSError:
            pass
        self.process.join(5)
        self.kill()

    def kill(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()
        self.process.join(5)
        self.connection.close()


def _wait(pool: list[_Worker]) -> None:
    from multiprocessing.connection import wait

    wait([worker.connection for worker in pool] + [worker.process.sentinel for worker in pool])


def _death(process: Any) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = ", e.g. by the out-of-memory killer" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit status {code}"


def _worker_main(
    connection: Any, function: Callable, initializer: Callable | None, initargs: tuple, parent: int
) -> None:
    end_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if initializer is not None:
            initializer(*initargs)
    except Exception as error:  # whatever stops it from starting is said in one line by the parent
        connection.send(("failed", f"{type(error).__name__}: {first_line(error)}"))
        return
    connection.send(("ready", None))
    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if job is None:
            return
        try:
            result = function(job[1])
        except Exception as error:  # one item's failure is that item's result; the worker goes on
            result = Failure(f"{type(error).__name__}: {first_line(error)}")
        try:
            connection.send(("done", result))
        except OSError:
            return  # the parent is gone
        except Exception as error:  # not picklable: it is pickled before any byte is sent
            connection.send(("done", Failure(f"its result cannot be sent back ({first_line(error)})")))


def end_with_parent(parent: int) -> None:
    """Make this process end when the process `parent` ends (called first thing in a worker)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # the watchdog below still ends it
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), name="controlkit-parent-watch", daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL)
    os._exit(1)  # orphaned: the parent was killed; nothing of ours is half-written (atomic writes)
