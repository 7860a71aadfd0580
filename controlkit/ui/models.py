"""What the page serves: one loaded base and the ControlNets it offers by name.

The base is loaded once at start and shared by every user (generation is thread-safe). ControlNets are loaded
on first use, once each even when several users ask at the same time, and kept: a real ControlNet is over a
gigabyte, and most sessions use one or two of those served. Without any ControlNet named, the demo base comes
with its six demo ControlNets.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlkit.errors import ConfigError, WeightsNotFoundError
from controlkit.weights import DEMO_CONTROLNETS, DEMO_NAME

#: Single files a models folder may hold as ControlNets (a single-file base is named with --base).
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".bin")



@dataclass
class ServedModels:
    """The served base with its ControlNet sources, and the ControlNets loaded so far.

    Attributes:
        base: the loaded base pipeline (`controlkit.load_base`).
        base_source: how the base was named ("demo", a folder or file), recorded in every PNG.
        sources: ControlNet name -> what loads it (a folder, a file, or "demo:NAME"), in page order.
    """

    base: Any
    base_source: str
    sources: dict[str, str]
    _loaded: dict[str, tuple[Any, Any]] = field(default_factory=dict, repr=False)
    _locks: dict[str, threading.Lock] = field(default_factory=dict, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def controlnet(self, name: str) -> tuple[Any, Any]:
        """(ControlNet, its condition metadata) for a served name, on the base's device and dtype."""
        from controlkit.checkpoint import load_controlnet
        from controlkit.weights import resolve_model_name

        if name not in self.sources:
            raise ConfigError(f"no ControlNet named {name!r} is served; served: {', '.join(self.sources) or 'none'}")
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:  # one load per name, however many users ask at once
            if name not in self._loaded:
                source = resolve_model_name(self.sources[name], "controlnet")
                self._loaded[name] = load_controlnet(source, unet=self.base.unet)
            return self._loaded[name]

    def defaults(self) -> dict[str, Any]:
        """What the page starts with: the base's steps, guidance and native size."""
        from controlkit.generation_options import generation_defaults, native_size

        width, height = native_size(self.base)
        return {**generation_defaults(self.base), "width": width, "height": height}


def load_models(
    base: str | None = None,
    controlnets: Mapping[str, str] | None = None,
    models_dir: str | None = None,
    *,
    base_config: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
) -> ServedModels:
    """Load the base and gather the ControlNet sources.

    Args:
        base: a base folder or file, or "demo"; default: the one base in `models_dir`, else the demo base.
        controlnets: name -> folder, file or "demo:NAME"; they come after (and override) those of `models_dir`.
        models_dir: a folder of models: subfolders with a model_index.json are bases, subfolders with a
            config.json and checkpoint files (.safetensors, .pth, .ckpt, .bin) are ControlNets named after them.
        base_config, device, dtype: as `controlkit generate`'s --base-config, --device and --dtype.
    """
    from controlkit.devices import device_and_dtype
    from controlkit.pipeline import load_base, quiet_loading

    found_base, sources = scan_models_dir(models_dir, base) if models_dir else (None, {})
    base = base or found_base or DEMO_NAME
    sources.update(controlnets or {})
    if not sources and base == DEMO_NAME:
        sources = {name: f"{DEMO_NAME}:{name}" for name in DEMO_CONTROLNETS}
    chosen_device, chosen_dtype = device_and_dtype(device, dtype)
    quiet_loading()
    pipeline = load_base(base, torch_dtype=chosen_dtype, device=chosen_device, config=base_config)
    served = ServedModels(pipeline, str(base), dict(sources))
    return served


def scan_models_dir(folder: str | os.PathLike, base: str | None) -> tuple[str | None, dict[str, str]]:
    """(the folder's base, or None when `base` is given; ControlNet name -> path) of a models folder."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise WeightsNotFoundError(f"--models-dir {folder}: no such folder")
    bases, sources = [], {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or (base and _same(entry, base)):
            continue
        if entry.is_dir() and (entry / "model_index.json").is_file():
            bases.append(str(entry))
        elif (entry.is_dir() and (entry / "config.json").is_file()) or entry.suffix.lower() in CHECKPOINT_SUFFIXES:
            sources[entry.stem if entry.is_file() else entry.name] = str(entry)
    if base is None and len(bases) > 1:
        names = ", ".join(Path(found).name for found in bases)
        raise ConfigError(f"--models-dir {folder} holds {len(bases)} bases ({names}); choose one with --base")
    return (bases[0] if bases and base is None else None), sources


def _same(entry: Path, base: str) -> bool:
    """Whether a models-folder entry is the base named with --base (so it is not also offered as a ControlNet)."""
    try:
        return entry.resolve() == Path(base).expanduser().resolve()
    except OSError:
        return False
