"""Offline-first resolution of model weights.

Order: an explicit local path, then the local models folder, then a file that ships inside an installed
package, then a hub id, and the hub only when the caller passed a hub id explicitly. Nothing here runs at
import time, and nothing touches the network unless a hub id was given.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

from controlkit.errors import WeightsNotFoundError


def models_dir() -> Path:
    """The local models folder: $CONTROLKIT_MODELS, else ~/.cache/controlkit/models."""
    configured = os.environ.get("CONTROLKIT_MODELS")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "controlkit" / "models"


def looks_like_hub_id(value: str) -> bool:
    """'org/name' with no local file of that name: the only form that is ever sent to the hub."""
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "~")) and not Path(value).exists()


def package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package, found without importing the package (imports can be heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / relative
        if candidate.is_file():
            return candidate
    return None


def resolve_weights(
    what: str,
    source: str | os.PathLike | None = None,
    *,
    local_names: Sequence[str] = (),
    bundled: tuple[str, str] | None = None,
    hub_filename: str | None = None,
    hint: str = "",
) -> Path:
    """Find weights for `what` offline first.

    Args:
        what: a short name for messages, e.g. "HED soft-edge".
        source: an explicit file or folder, or a hub id 'org/name' (then `hub_filename` is fetched from it,
            or the whole repository when `hub_filename` is None).
        local_names: file or folder names to look for in `models_dir()`.
        bundled: (package, relative path) of weights shipped inside an installed package.
        hub_filename: the file to fetch when `source` is a hub id.
        hint: what the user can do when nothing is found; appended to the error.

    Returns:
        The path of an existing file or folder.

    Raises:
        WeightsNotFoundError: one line saying what was looked for and how to supply it.
    """
    if source is not None:
        path = Path(source).expanduser()
        if path.exists():
            return path
        if looks_like_hub_id(str(source)):
            return _from_hub(what, str(source), hub_filename)
        raise WeightsNotFoundError(f"{what} weights: {source} does not exist")
    for name in local_names:
        candidate = models_dir() / name
        if candidate.exists():
            return candidate
    if bundled is not None:
        found = package_file(*bundled)
        if found is not None:
            return found
    searched = ", ".join(str(models_dir() / name) for name in local_names) or "no local names"
    raise WeightsNotFoundError(f"{what} weights not found (looked in {searched}). {hint}".strip())


def _from_hub(what: str, repo_id: str, filename: str | None) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if filename is None:
            return Path(snapshot_download(repo_id))
        return Path(hf_hub_download(repo_id, filename))
    except Exception as error:  # the hub raises many types (offline, 404, auth); all mean "not available"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        # 'org/name' is also a valid relative path: say both, so a mistyped local path is not read as a hub miss.
        raise WeightsNotFoundError(
            f"{what} weights: {repo_id} is not a local file or folder, and fetching it as a hub id failed "
            f"({reason}); pass an existing local path"
        ) from None
