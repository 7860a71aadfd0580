"""Writing files so that they are whole or absent, and checking where they go before any work is done.

Every output that a later run trusts (maps that make `annotate` skip an input, manifests, cached conditions,
checkpoints, generated images) is written through `atomic_path`: a temporary name beside the target, then one
rename, so an interrupted or failed write never leaves a half-written file behind. A write that fails (a full
disk, a read-only folder) is one `OutputError` line naming the file; nothing is left under the target's name.
Commands check their output location with `check_output_folder` / `check_output_file` before they start, so a
long run does not find out at the end that it cannot write.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from controlkit.errors import OutputError

#: Prefix of every temporary file controlkit writes beside a target; `remove_stale_temporaries` knows them by it.
TEMPORARY_PREFIX = ".ck-"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; rename it onto `path` if the block succeeds, else delete it.

    The temporary name keeps the target's suffix (some writers pick the format from it) and carries the
    process id, so parallel workers never share one.

    Raises:
        OutputError: the folder cannot be made or the file cannot be written (the reason, e.g. no space left).
    """
    target = Path(path)
    temporary = target.with_name(f"{TEMPORARY_PREFIX}{target.stem}.{os.getpid()}.tmp{target.suffix}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield temporary
        os.replace(temporary, target)
    except OSError as error:
        if error.errno is None:  # not a file-system failure (e.g. an encoder's own error): the caller's to word
            raise
        raise OutputError(f"{target}: could not be written ({_reason(error)}); nothing was written there") from None
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass  # the folder itself is gone or unwritable; the error above says so


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` whole or not at all."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def check_output_folder(folder: str | os.PathLike, what: str) -> Path:
    """The folder `what` names (an option such as '-o'), created if missing, after checking it can be written.

    Raises:
        OutputError: it is a file, lies under a file, or cannot be created or written; the message names `what`.
    """
    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{what} {target}: is a file, not a folder; choose a folder")
    try:
        target.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=target, prefix=f"{TEMPORARY_PREFIX}write-test-")
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise OutputError(f"{what} {target}: cannot write there ({_reason(error)}); choose another folder") from None
    return target


def check_output_file(path: str | os.PathLike, what: str, *, suffix: str | None = None) -> Path:
    """Check, before any work, that the file `what` names can be written: its folder (created if missing) is
    writable, it is not a folder, and it ends with `suffix` when one is required (e.g. '.png').

    Raises:
        OutputError: one line naming `what` and the fix.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{what} {target}: is a folder; give a file name such as {target / ('out' + (suffix or ''))}")
    if suffix is not None and target.suffix.lower() != suffix:
        raise OutputError(f"{what} {target}: the output must be a {suffix} path")
    check_output_folder(target.parent if str(target.parent) else Path("."), what)
    return target


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporary files that killed writers left in `folder` (recursively); returns how many.

    Only names with `TEMPORARY_PREFIX` and '.tmp' are touched, and only those of processes that no longer run.
    """
    removed = 0
    for path in Path(folder).rglob(f"{TEMPORARY_PREFIX}*.tmp*"):
        pid = _writer_pid(path.name)
        if pid is not None and _running(pid):
            continue
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _writer_pid(name: str) -> int | None:
    """The process id in '.ck-<stem>.<pid>.tmp<suffix>' (None when the name carries none)."""
    before_tmp = name.rsplit(".tmp", 1)[0]
    digits = before_tmp.rsplit(".", 1)[-1]
    return int(digits) if digits.isdigit() else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True  # running (this process included: its temporaries may be open)


def _reason(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "no space left on the device"
    if error.errno in (errno.ENOTDIR, errno.EEXIST):  # EEXIST: mkdir met a file where a folder goes
        return "a part of the path is a file, not a folder"
    return error.strerror or str(error)
