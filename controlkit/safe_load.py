"""Reading tensors from weight files without ever running code from them.

A file is recognised by its first bytes, never by its extension:
- safetensors: an 8-byte little-endian header length, then a JSON header starting with '{';
- a PyTorch zip checkpoint ('PK'), or a legacy PyTorch pickle (protocol byte 0x80);
- things that are not weights at all, each with its own message: a Git LFS pointer, an HTML page, a JSON
  document, an empty file.

Pickles are read only by `torch.load(weights_only=True)`, passed explicitly so that an environment variable
(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) cannot turn it off, never with a custom pickle_module, never retried without it.
Old Lightning `.ckpt` files name a few harmless classes (the ModelCheckpoint callback, numpy scalars and dtypes);
those names are bound to inert local stand-ins so the weights still load, and the real classes are never imported.
Anything else outside torch's allowlist is refused with UnsafeCheckpointError naming the globals it would need.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit.errors import CheckpointError, UnsafeCheckpointError, first_line

if TYPE_CHECKING:
    import torch

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch zip"
TORCH_PICKLE = "legacy torch pickle"

#: The safetensors parser refuses larger headers; checking first gives our message instead of its.
SAFETENSORS_HEADER_LIMIT = 100_000_000
#: Torch versions before this one can run code even with weights_only=True (CVE-2025-32434).
MIN_SAFE_TORCH = (2, 6)


@dataclass
class RawCheckpoint:
    """Tensors read from one file.

    Attributes:
        path: the file.
        kind: SAFETENSORS, TORCH_ZIP or TORCH_PICKLE.
        tensors: name -> tensor (CPU), only the names the caller kept.
        metadata: safetensors header metadata (string -> string); empty for pickles.
        skipped: how many tensor names the caller's filter left out.
    """

    path: Path
    kind: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    skipped: int = 0


def sniff_format(path: str | os.PathLike) -> str:
    """What a file is, from its first bytes: SAFETENSORS, TORCH_ZIP or TORCH_PICKLE.

    Raises:
        CheckpointError: for a file that is not weights (empty, Git LFS pointer, HTML, JSON, unknown bytes), with
            a message saying what it is and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(64)
    text_start = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the download or copy failed, fetch the file again")
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(
            f"{path} is a Git LFS pointer ({size} bytes), not the weights; run `git lfs pull` in its repository "
            "or download the file itself"
        )
    if text_start[:1] == b"<":
        raise CheckpointError(
            f"{path} is an HTML page, not weights (a web page or error page was saved instead of the file); "
            "download the file itself (on the hub: the 'download' link, or a URL with /resolve/)"
        )
    if size >= 9 and head[8:9] == b"{":  # first: a header length of 128..255 (mod 256) starts with 0x80 too
        return SAFETENSORS
    if head[:2] == b"PK":
        return TORCH_ZIP
    if head[:1] == b"\x80":
        return TORCH_PICKLE
    if text_start[:1] in (b"{", b"["):
        raise CheckpointError(f"{path} is a JSON document, not weights; pass the weights file or the folder")
    raise CheckpointError(
        f"{path} is not a weights file (unrecognised content starting {head[:12]!r}); expected safetensors or "
        "a PyTorch .pth/.ckpt"
    )


def read_tensors(path: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> RawCheckpoint:
    """All tensors of a safetensors or PyTorch file whose names pass `keep` (default: all), on the CPU.

    A `.safetensors` name with pickle content is refused: users and other tools treat that extension as free of
    code, so a pickle behind it is a disguise, not a format. Nested Lightning checkpoints ({'state_dict': ...})
    are unwrapped; values that are not tensors are dropped.

    Raises:
        CheckpointError: not weights, truncated, corrupt, or holding no tensors.
        UnsafeCheckpointError: a pickle that would need code outside the weights-only allowlist.
    """
    path = Path(path)
    kind = sniff_format(path)
    keep = keep or (lambda name: True)
    if kind != SAFETENSORS and path.suffix.lower() == ".safetensors":
        raise CheckpointError(
            f"{path} is named .safetensors but holds a PyTorch pickle ({kind}); refusing a disguised pickle. "
            "Get a real safetensors file, or rename it to .pth if you know where it came from"
        )
    if kind == SAFETENSORS:
        raw = _read_safetensors(path, keep)
    else:
        raw = _read_pickle(path, kind, keep)
    if not raw.tensors and not raw.skipped:
        raise CheckpointError(f"{path} holds no tensors")
    return raw


def _read_safetensors(path: Path, keep: Callable[[str], bool]) -> RawCheckpoint:
    from safetensors import SafetensorError, safe_open

    _check_safetensors_size(path)
    tensors: dict[str, Any] = {}
    skipped = 0
    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            metadata = dict(reader.metadata() or {})
            for name in reader.keys():
                if keep(name):
                    tensors[name] = _aligned(reader.get_tensor(name))
                else:
                    skipped += 1
    except SafetensorError as error:
        raise CheckpointError(f"{path} is a corrupt safetensors file ({error}); download it again") from None
    return RawCheckpoint(path, SAFETENSORS, tensors, metadata, skipped)


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in fresh memory when the reader's buffer is not 64-byte aligned: CPU kernels take other code paths
    on unaligned data, and the results then differ in the last bits from the same weights loaded elsewhere."""
    return tensor.clone() if tensor.data_ptr() % 64 else tensor


def _check_safetensors_size(path: Path) -> None:
    """Compare the file size with what its header describes, so a cut download says 'truncated'."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        if header_length > SAFETENSORS_HEADER_LIMIT:
            raise CheckpointError(f"{path} is not a valid safetensors file (header length {header_length})")
        if size < 8 + header_length:
            raise CheckpointError(f"{path} is truncated ({size} bytes, its header alone is {8 + header_length})")
        try:
            header = json.loads(handle.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is a corrupt safetensors file (its header is not JSON)") from None
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"
            if isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    expected = 8 + header_length + max(ends, default=0)
    if size < expected:
        raise CheckpointError(
            f"{path} is truncated: {size} bytes, its header describes {expected}; download it again"
        )


def _read_pickle(path: Path, kind: str, keep: Callable[[str], bool]) -> RawCheckpoint:
    import torch

    _require_safe_torch(path)
    if kind == TORCH_ZIP:
        _check_torch_zip(path)
    size = path.stat().st_size
    with torch.serialization.safe_globals(_inert_stand_ins()):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == TORCH_ZIP)
        except pickle.UnpicklingError as error:
            needed = _unsafe_globals(path, kind, error)
            if needed:
                raise UnsafeCheckpointError(
                    f"{path} was refused: unpickling it would need {', '.join(needed)}, which is outside the "
                    "weights-only allowlist (nothing from it was run); use a .safetensors version of the checkpoint"
                ) from None
            raise CheckpointError(f"{path} is corrupt or truncated ({size} bytes): {first_line(error)}") from None
        except (EOFError, RuntimeError, OSError, ValueError, struct.error) as error:
            raise CheckpointError(f"{path} is corrupt or truncated ({size} bytes): {first_line(error)}") from None
    tensors, skipped = _tensors_of(loaded, keep)
    return RawCheckpoint(path, kind, tensors, {}, skipped)


def _require_safe_torch(path: Path) -> None:
    import torch

    version = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    if version < MIN_SAFE_TORCH:
        raise UnsafeCheckpointError(
            f"{path} is a pickle and torch {torch.__version__} cannot unpickle safely (CVE-2025-32434); "
            "upgrade torch to 2.6 or later, or use a .safetensors file"
        )


def _check_torch_zip(path: Path) -> None:
    """A torch zip has its central directory at the end: a cut download loses it first."""
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is truncated or corrupt ({size} bytes, the zip archive is incomplete)")
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
    if len(pickles) != 1:
        raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint")


def _unsafe_globals(path: Path, kind: str, error: Exception) -> list[str]:
    """The globals a refused pickle needs, found without executing it."""
    import torch

    if kind == TORCH_ZIP:
        try:
            found = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # a damaged archive: fall back to the name in torch's message
            found = []
        if found:
            return found
    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(error))))


def _tensors_of(loaded: Any, keep: Callable[[str], bool]) -> tuple[dict[str, Any], int]:
    import torch

    for wrapper in ("state_dict", "model"):  # Lightning checkpoints; NormalBAE's released {"model": ...}
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"a checkpoint must hold a dict of tensors, this one holds a {type(loaded).__name__}")
    tensors: dict[str, Any] = {}
    skipped = 0
    for name, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            continue
        if keep(str(name)):
            tensors[str(name)] = value
        else:
            skipped += 1
    return tensors, skipped




class _Inert:
    """Stands in for a harmless class or function an old checkpoint names; accepts anything, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


#: Globals of legitimate SD/ControlNet .ckpt files that carry no weights: the Lightning callback and the numpy
#: scalar/dtype objects used for bookkeeping values (global_step, best score).
_HARMLESS_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "numpy.dtypes.Float64DType",
    "numpy.dtypes.Float32DType",
    "numpy.dtypes.Int64DType",
    "numpy.dtypes.Int32DType",
)


def _inert_stand_ins() -> list[tuple[type, str]]:
    return [(_Inert, name) for name in _HARMLESS_GLOBALS]
