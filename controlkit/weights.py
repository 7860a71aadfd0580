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


#: The shipped demo models (controlkit/demo/weights): a path table in the core, so that every loader resolves
#: the short names below without importing the demo floor.
DEMO_WEIGHTS_DIR = Path(__file__).resolve().parent / "demo" / "weights"
#: The short name of the demo base; "demo:NAME" names the demo ControlNet for condition NAME.
DEMO_NAME = "demo"
#: The conditions with a shipped demo ControlNet, in the order the demo shows them.
DEMO_CONTROLNETS = ("canny", "lineart", "softedge", "pose", "depth", "normal", "scribble", "tile", "shuffle", "inpaint")
MODEL_KINDS = ("base", "controlnet")


def resolve_model_name(source: str | os.PathLike, kind: str) -> str | os.PathLike:
    """The folder (a Path) a short model name stands for, else `source` unchanged (a path or hub id for the loader).

    Short names, accepted wherever a base (`kind` "base") or a ControlNet ("controlnet") is named:
    "demo" is the shipped demo base, "demo:canny" (any of `DEMO_CONTROLNETS`) its ControlNet for that condition.
    The short name wins over a local folder called "demo"; write "./demo" for that folder.

    Raises:
        WeightsNotFoundError: a demo name of the wrong kind or condition, or demo weights missing from the install.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    if not isinstance(source, str) or not (source == DEMO_NAME or source.startswith(DEMO_NAME + ":")):
        return source
    names = ", ".join(f"{DEMO_NAME}:{name}" for name in DEMO_CONTROLNETS)
    condition = source.partition(":")[2]
    if kind == "base":
        if condition:
            raise WeightsNotFoundError(f"{source} is a demo ControlNet, not a base; the demo base is {DEMO_NAME!r}")
        return _demo_folder(DEMO_WEIGHTS_DIR / "base", "model_index.json", "demo base model")
    if condition not in DEMO_CONTROLNETS:
        raise WeightsNotFoundError(f"{source!r} is not a demo ControlNet; the demo ControlNets are {names}")
    return _demo_folder(DEMO_WEIGHTS_DIR / "controlnets" / condition, "config.json", f"demo {condition} ControlNet")


def _demo_folder(folder: Path, marker: str, what: str) -> Path:
    if not (folder / marker).is_file():
        raise WeightsNotFoundError(
            f"{what}: {folder / marker} is missing; reinstall controlkit, or rebuild the demo models: "
            "python -m controlkit.demo.recipe all (docs/demo.md)"
        )
    return folder
