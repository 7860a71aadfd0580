"""Where models run, in which precision and on how many CPU threads, from the names a user types ("cuda",
"float16", "auto").

    >>> device_and_dtype()                 # on a machine with a GPU
    (device(type='cuda'), torch.float16)
    >>> device_and_dtype("cpu", "auto"), torch_dtype("bfloat16")
    ((device(type='cpu'), torch.float32), torch.bfloat16)
    >>> usable_device("cuda")              # on a machine without one
    ConfigError: device 'cuda': no cuda device here (this torch has no CUDA build); use cpu

`cpu_threads` chooses torch's CPU threads so that a busy machine slows generation down in proportion instead of
collapsing it; the command line applies it to every command that runs a model (`cpu_threads_for_run`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from controlkit.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: The floating-point types weights can be loaded or written in.
DTYPE_NAMES = ("float32", "float16", "bfloat16")
#: The dtype name that picks the device's usual precision.
AUTO = "auto"


def torch_dtype(name: str) -> torch.dtype:
    """'float16' -> torch.float16, for the names in `DTYPE_NAMES`; ConfigError naming them otherwise."""
    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    import torch

    return getattr(torch, name)


def device_and_dtype(device: str | None = None, dtype: str = AUTO) -> tuple[torch.device, torch.dtype]:
    """The device to run on (given, else cuda when available, else cpu) and the weights' dtype.

    Args:
        device: a torch device string ("cuda", "cuda:1", "cpu", ...) or None to choose.
        dtype: a name of `DTYPE_NAMES`, or "auto": float16 on CUDA (half the memory, the speed of its tensor
            cores), float32 elsewhere (CPU half precision is slow and imprecise).

    A malformed name is a ConfigError here; whether the device exists on this machine is `usable_device`'s check.
    """
    import torch

    chosen = parse_device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == AUTO:
        return chosen, torch.float16 if chosen.type == "cuda" else torch.float32
    return chosen, torch_dtype(dtype)


def parse_device(name: str | torch.device, what: str = "device") -> torch.device:
    """A torch device from its name ("cpu", "cuda", "cuda:1", "mps"); ConfigError naming `what` for a malformed one."""
    import torch

    try:
        return torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{what} {name!r}: not a device name; use cpu, cuda, cuda:N or mps") from None


def usable_device(name: str | torch.device, what: str = "device") -> torch.device:
    """`name` as a torch device after checking that it exists on this machine (a CUDA device when torch has CUDA
    and that GPU is there, ...): else ConfigError, one line naming `what` and what is available, instead of the
    assertion torch raises deep inside the first `.to(device)`."""
    import torch

    device = parse_device(name, what)
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise ConfigError(f"{what} {str(name)!r}: the meta device holds no data and cannot run; use {_available()}")
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    available = backend is not None and getattr(backend, "is_available", lambda: False)()
    if not available:
        build = " (this torch has no CUDA build)" if device.type == "cuda" and torch.version.cuda is None else ""
        raise ConfigError(f"{what} {str(name)!r}: no {device.type} device here{build}; use {_available()}")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{what} {str(name)!r}: there are {count} {device.type} devices (0..{count - 1}); use one")
    return device


def _available() -> str:
    """The devices that can run here, for messages: 'cpu', 'mps or cpu', or 'cuda (cuda:0..cuda:N) or cpu'."""
    import torch

    if torch.cuda.is_available():
        return f"cuda (cuda:0..cuda:{torch.cuda.device_count() - 1}) or cpu"
    mps = getattr(torch.backends, "mps", None)
    return "mps or cpu" if mps is not None and mps.is_available() else "cpu"


#: How long `cpu_threads` watches the CPUs to see how busy other processes keep them.
BUSY_SAMPLE_SECONDS = 0.1
#: A core counts as free when at least this fraction of it was idle during the sample.
FREE_CORE = 0.7


def cpu_threads(sample_seconds: float = BUSY_SAMPLE_SECONDS) -> int:
    """Threads for torch's CPU work that degrade gracefully when other processes share the machine.

    torch's default is one OpenMP thread per core, and its threads meet at a barrier after every operation: when
    another process holds one of those cores, the whole team waits for the preempted thread at every barrier
    (measured: `controlkit demo` 244 s instead of 13 s at load 9 on 2 cores; a 20-step demo generation 36 s
    instead of 3.8 s with 8 competing processes, tests/benchmarks/test_threads_under_load.py). So: the physical
    cores this process
    may run on (its affinity mask, hyper-threads counted once, a cgroup CPU quota if lower), less the cores other
    processes kept busy over `sample_seconds` (read from /proc/stat), at least 1. Without /proc/stat (not Linux),
    the 1-minute load average stands in for the busy cores.
    """
    import os

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = min(_physical_cores(cpus), _cgroup_quota() or len(cpus))
    idle = _idle_cpus(cpus, sample_seconds)
    if idle is None:  # no per-CPU counters: the load average counts the runnable processes
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        idle = len(cpus) - load
    free = int(idle + (1.0 - FREE_CORE))  # a core idle for FREE_CORE of the sample counts as free
    return max(1, min(cores, free))


def use_cpu_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to `threads`, else $OMP_NUM_THREADS when the user set it, else `cpu_threads()`;
    returns the number set."""
    import torch

    chosen = threads or _user_threads() or cpu_threads()
    torch.set_num_threads(chosen)
    return chosen


@contextmanager
def cpu_threads_for_run(threads: int | None = None) -> Iterator[int]:
    """Within the block, torch's CPU work uses `threads`, else $OMP_NUM_THREADS when the user set it, else
    `cpu_threads()` divided among the processes of one distributed launch ($LOCAL_WORLD_SIZE); restored after.

    When torch is not imported yet, the count goes into $OMP_NUM_THREADS, which torch reads when it is first
    imported, so commands that never need torch never pay for importing it.
    """
    import os
    import sys

    chosen = threads or _user_threads()
    if chosen is None:
        peers = os.environ.get("LOCAL_WORLD_SIZE", "1")
        chosen = max(1, cpu_threads() // (int(peers) if peers.isdigit() and int(peers) > 0 else 1))
    torch = sys.modules.get("torch")
    saved_env = os.environ.get("OMP_NUM_THREADS")
    saved = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(chosen)
    else:
        os.environ["OMP_NUM_THREADS"] = str(chosen)
    try:
        yield chosen
    finally:
        if saved is not None:
            sys.modules["torch"].set_num_threads(saved)
        elif saved_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_env


def _user_threads() -> int | None:
    """$OMP_NUM_THREADS when it is a positive integer (the user's explicit choice), else None."""
    import os

    configured = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(configured) if configured.isdigit() and int(configured) > 0 else None


def _physical_cores(cpus: list[int]) -> int:
    """Cores among `cpus`, hyper-thread siblings counted once (Linux sysfs; else every CPU counts)."""
    from pathlib import Path

    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def _cgroup_quota() -> int | None:
    """CPUs a cgroup v2 quota allows (cpu.max 'QUOTA PERIOD'), rounded down, at least 1; None without a quota."""
    from pathlib import Path

    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, int(quota) // int(period))


def _idle_cpus(cpus: list[int], seconds: float) -> float | None:
    """How many of `cpus` were idle over `seconds` (a sum of idle fractions), from /proc/stat; None without it."""
    import time

    first = _cpu_times()
    if first is None:
        return None
    time.sleep(seconds)
    second = _cpu_times() or {}
    idle = 0.0
    for cpu in cpus:
        if cpu not in first or cpu not in second:
            return None
        total = sum(second[cpu]) - sum(first[cpu])
        waiting = (second[cpu][3] + second[cpu][4]) - (first[cpu][3] + first[cpu][4])  # idle + iowait
        idle += waiting / total if total > 0 else 1.0
    return idle


def _cpu_times() -> dict[int, list[int]] | None:
    """Per-CPU jiffies from /proc/stat: {cpu: [user, nice, system, idle, iowait, irq, softirq, steal]}."""
    try:
        lines = open("/proc/stat", encoding="ascii").read().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            times[int(name[3:])] = [int(value) for value in values[:8]]
    return times or None
