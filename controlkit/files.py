"""Writing files so that they are whole or absent: a temporary name beside the target, then one rename.

Every output that a later run trusts (maps that make `annotate` skip an input, manifests, cached conditions,
checkpoints) is written this way, so an interrupted or failed write never leaves a half-written file behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; rename it onto `path` if the block succeeds, else delete it.

    The temporary name keeps the target's suffix (some writers pick the format from it) and carries the
    process id, so parallel workers never share one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.stem}.{os.getpid()}.tmp{target.suffix}")
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` whole or not at all."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
