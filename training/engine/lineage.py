"""Where each checkpoint sits in a run's history, which one `latest` is, and which ones rotation removes.

`complete.json` also records the checkpoint's place in the run's history: `sequence` (its write order
in the folder: one more than any checkpoint there before it), `branch` and `parent` (the checkpoint it descends
from). Resuming the newest checkpoint of a branch continues that branch; resuming an older one (rewinding) starts
a new branch, whose checkpoints are named `checkpoint-<step>-branch<N>` so they never replace the abandoned
branch's. `latest` is the newest checkpoint by write order, whatever its step. Rotation removes the oldest
checkpoints by write order, never the one just written and never the one a rewound run resumed from; the
abandoned branch's checkpoints are kept until they are the oldest. Checkpoints written before lineage was
recorded count as branch 0, older than any that has it, in the order of their steps.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX, MANIFEST = "checkpoint-", "complete.json"
_NAME = re.compile(r"^checkpoint-(\d+)(?:-branch(\d+))?$")


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint folder and its place in the run's history (see the module docstring).

    Attributes:
        sequence: write order within the folder, from 1 (0: written before lineage was recorded).
        branch: 0 for the first run; each rewind (resuming an older checkpoint) starts the next number.
        parent: the folder name of the checkpoint it descends from (a path when that lies elsewhere), or None.
    """

    step: int
    path: Path
    sequence: int
    branch: int
    parent: str | None


@dataclass
class Lineage:
    """Where a run's next checkpoint goes: its branch, its parent, and the checkpoint rotation must keep.

    Attributes:
        protected: the checkpoint a rewound run resumed from; rotation never removes it while this run goes on.
    """

    branch: int = 0
    parent: str | None = None
    protected: Path | None = None


def checkpoint_name(step: int, branch: int = 0) -> str:
    """`checkpoint-<step>` on the first branch, `checkpoint-<step>-branch<N>` on a rewound run's."""
    return f"{PREFIX}{step:08d}" + (f"-branch{branch}" if branch else "")


def scan_checkpoints(root: str | Path) -> list[Checkpoint]:
    """Every complete checkpoint under `root`, oldest first by write order; anything else is ignored."""
    found = []
    for path in Path(root).glob(f"{PREFIX}*") if Path(root).is_dir() else ():
        match = _NAME.match(path.name)
        manifest = read_manifest(path) if match else None
        if manifest is not None:
            lineage = manifest.get("lineage") if isinstance(manifest.get("lineage"), dict) else {}
            found.append(Checkpoint(
                step=int(match.group(1)), path=path, sequence=_int(lineage.get("sequence")),
                branch=_int(lineage.get("branch", match.group(2))), parent=lineage.get("parent"),
            ))
    return sorted(found, key=lambda entry: (entry.sequence, entry.step, entry.branch))


def _int(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def continue_lineage(root: str | Path, resumed: Path) -> Lineage:
    """The lineage of a run resumed from `resumed`: its branch when it is that branch's newest checkpoint, else
    a new branch (a rewind) that keeps `resumed` from rotation."""
    found = scan_checkpoints(root)
    entry = next((item for item in found if item.path.resolve() == resumed.resolve()), None)
    if entry is None:  # a checkpoint from elsewhere starts this folder's history anew
        branch = max((item.branch for item in found), default=-1) + 1
        return Lineage(branch=branch, parent=str(resumed))
    newer = [item for item in found if item.branch == entry.branch and item.sequence > entry.sequence]
    newer += [item for item in found if item.branch == entry.branch and item.sequence == entry.sequence == 0
              and item.step > entry.step]
    if not newer:  # the run continues where it stopped, as if it had never been interrupted
        return Lineage(branch=entry.branch, parent=entry.path.name)
    branch = max(item.branch for item in found) + 1
    return Lineage(branch=branch, parent=entry.path.name, protected=entry.path)


def rotate(root: Path, total_limit: int, keep: tuple[Path | None, ...]) -> list[Path]:
    """Remove the oldest checkpoints by write order until `total_limit` remain, never one in `keep`; returns the
    removed folders."""
    found = scan_checkpoints(root)
    kept = {path.resolve() for path in keep if path is not None}
    removable = [entry.path for entry in found if entry.path.resolve() not in kept]
    removed = removable[: max(0, len(found) - total_limit)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The checkpoint's manifest when every file it lists is there with its size (None: not a checkpoint)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        complete = all((path / name).stat().st_size == entry["size"] for name, entry in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest if complete else None
