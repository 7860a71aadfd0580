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
Anything else outside torch's allowlist is refused with UnsafeCheckpointError naming the globals it would need (or
the pickle instructions the weights-only reader does not run), found by `pickle_scan` without running anything;
torch's own advice to retry with weights_only=False is never repeated.

Everything read from a file before it is trusted is bounded first: JSON documents (configs, indexes, headers) by
size, nesting and type (`controlkit.json_files`), safetensors headers entry by entry (types, offsets,
tensor count) before the safetensors reader or anything else allocates from them.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

from controlkit.errors import CheckpointError, UnsafeCheckpointError, preview
from controlkit.json_files import parse_json_object, read_json_file

if TYPE_CHECKING:
    import torch

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch zip"
TORCH_PICKLE = "legacy torch pickle"

#: Largest safetensors header read: a full SDXL checkpoint's is under 1 MB; 32 MiB holds MAX_TENSORS entries.
SAFETENSORS_HEADER_LIMIT = 32 * 2**20
#: Most tensors one file or index may name: a full SDXL checkpoint with EMA has about 5,000.
MAX_TENSORS = 100_000
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


def read_sharded(index: str | os.PathLike) -> RawCheckpoint:
    """All tensors of a sharded checkpoint from its `*.safetensors.index.json`, on the CPU (metadata: the first
    shard's).

    The index is untrusted: its weight_map must map tensor names to plain file names next to it (no folder, no
    '..', no absolute path: nothing outside the folder is ever opened), and every tensor it lists must be in its
    shard.

    Raises:
        CheckpointError: a damaged index (see `json_files`), a shard outside the folder or of the wrong JSON type,
            a shard that lacks a tensor the index lists, or anything `read_tensors` refuses.
    """
    index = Path(index)
    weight_map = read_json_file(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map; the sharded checkpoint is incomplete")
    if len(weight_map) > MAX_TENSORS:
        raise CheckpointError(f"{index} lists {len(weight_map):,} tensors, more than the {MAX_TENSORS:,} accepted")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index}: weight_map entry {tensor[:60]!r} is {_shown(shard)}, not a shard file "
                                  "name")
        if not _plain_file_name(shard):
            raise CheckpointError(f"{index}: weight_map names the shard {_shown(shard)}, which is not a file next to "
                                  "the index; shards must be plain file names in the same folder (nothing was read)")
    tensors: dict[str, Any] = {}
    metadata: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        raw = read_tensors(index.parent / shard)
        missing = sorted(t for t, s in weight_map.items() if s == shard and t not in raw.tensors)
        if missing:
            raise CheckpointError(f"{index} lists {len(missing)} tensors that {shard} does not hold "
                                  f"({preview(missing)}); the sharded checkpoint is incomplete")
        tensors.update(raw.tensors)
        metadata = metadata or raw.metadata
    return RawCheckpoint(index, SAFETENSORS, tensors, metadata)


def _plain_file_name(name: str) -> bool:
    """A name that stays inside its folder: one path component, not '.' or '..', no drive or separator."""
    return bool(name) and name not in (".", "..") and "\0" not in name and (
        PurePosixPath(name).name == name == PureWindowsPath(name).name)


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
    """Read and check the header before the safetensors reader allocates from it: every entry's type, its offsets,
    the tensor count, and the file size it describes (so a cut download says 'truncated')."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        if header_length > SAFETENSORS_HEADER_LIMIT:
            raise CheckpointError(f"{path} is not a valid safetensors file (header length {header_length:,} bytes, "
                                  f"at most {SAFETENSORS_HEADER_LIMIT:,} are read)")
        if size < 8 + header_length:
            raise CheckpointError(f"{path} is truncated ({size} bytes, its header alone is {8 + header_length})")
        header = parse_json_object(handle.read(header_length), f"{path}: the safetensors header")
    if len(header) > MAX_TENSORS + 1:
        raise CheckpointError(f"{path}: the safetensors header names {len(header):,} tensors, more than the "
                              f"{MAX_TENSORS:,} accepted; it is not a model checkpoint")
    ends = [_entry_end(path, name, entry) for name, entry in header.items()]
    expected = 8 + header_length + max(ends, default=0)
    if size < expected:
        raise CheckpointError(
            f"{path} is truncated: {size} bytes, its header describes {expected}; download it again"
        )


def _entry_end(path: Path, name: str, entry: Any) -> int:
    """Where one header entry's data ends; raises on an entry of the wrong JSON types."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: the safetensors header entry {name[:60]!r} {what}; the file is damaged "
                               "or was not written by a safetensors writer")

    if name == "__metadata__":
        if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
            raise bad("must map strings to strings")
        return 0
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise bad("must be an object with a string dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_count(n) for n in shape):
        raise bad(f"has shape {_shown(shape)}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(n) for n in offsets) or (
            offsets[0] > offsets[1]):
        raise bad(f"has data_offsets {_shown(offsets)}, not [begin, end] with 0 <= begin <= end")
    return offsets[1]


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shown(value: Any, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_pickle(path: Path, kind: str, keep: Callable[[str], bool]) -> RawCheckpoint:
    import torch

    _require_safe_torch(path)
    if kind == TORCH_ZIP:
        _check_torch_zip(path)
    size = path.stat().st_size
    # torch warns about pickle protocols it may not read; the refusal below says it in one line instead
    with torch.serialization.safe_globals(_inert_stand_ins()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == TORCH_ZIP)
        except pickle.UnpicklingError as error:
            raise _refusal(path, kind, size, error) from None
        except Exception as error:  # torch.load on damaged bytes raises nearly anything (IndexError, KeyError, ...)
            raise CheckpointError(f"{path} is corrupt or truncated ({size} bytes): {_reason(error)}") from None
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
    try:
        complete = zipfile.is_zipfile(path)
        if complete:
            with zipfile.ZipFile(path) as archive:
                pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
    except Exception:  # zipfile raises many kinds on damaged bytes (BadZipFile, NotImplementedError, struct.error)
        complete = False
    if not complete:
        raise CheckpointError(f"{path} is truncated or corrupt ({size} bytes, the zip archive is incomplete)")
    if len(pickles) != 1:
        raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint")


#: Globals in torch's weights-only allowlist (besides torch's own) that plain torch.save checkpoints use.
_ALLOWLISTED = ("collections.OrderedDict", "collections.Counter", "_codecs.encode", "builtins.bytearray",
                "builtins.set", "builtins.complex")


def _refusal(path: Path, kind: str, size: int, error: Exception) -> CheckpointError:
    """Why the weights-only unpickler refused a file, from a static scan of its pickle (nothing is run): the
    globals it would need, the instructions it uses that the reader does not run, or the damage."""
    from controlkit.pickle_scan import scan_checkpoint

    scan = scan_checkpoint(path, zipped=kind == TORCH_ZIP)
    # torch names the global it stopped at, builtins without their module
    named = {name if "." in name else f"builtins.{name}" for name in re.findall(r"GLOBAL ([\w.]+)", str(error))}
    needed = sorted(named | {name for name in scan.globals if not _allowlisted(name)})
    advice = "(nothing from it was run); use a .safetensors version of the checkpoint"
    if scan.cut:  # a cut file: the name torch stopped at may itself be cut short
        return CheckpointError(f"{path} is corrupt or truncated ({size} bytes): its pickle data {scan.damage}; "
                               "download it again")
    if needed:
        return UnsafeCheckpointError(f"{path} was refused as unsafe: unpickling it would need {preview(needed, 5)}, "
                                     f"which is outside the weights-only allowlist {advice}")
    if scan.unsupported:
        return UnsafeCheckpointError(
            f"{path} was refused as unsafe: its pickle (protocol {scan.protocol}) uses {preview(scan.unsupported)}, "
            f"instructions the weights-only reader does not run {advice}"
        )
    if scan.damage:
        return CheckpointError(f"{path} is corrupt or truncated ({size} bytes): its pickle data {scan.damage}; "
                               "download it again")
    return UnsafeCheckpointError(f"{path} was refused as unsafe: the weights-only reader rejected its pickle "
                                 f"({_reason(error)}) {advice}")


def _allowlisted(name: str) -> bool:
    return name.startswith("torch.") or name in _ALLOWLISTED or name in _HARMLESS_GLOBALS


def _reason(error: Exception) -> str:
    """A library's message for a one-line report, without torch's advice to load the file unsafely."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not re.search(r"weights_only|Weights only load failed|trust|add_safe_globals"
                                                     r"|documentation of torch\.load|file an issue", line)]
    if lines:
        return lines[0][:200]
    return "the data ends early" if isinstance(error, EOFError) else type(error).__name__


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
