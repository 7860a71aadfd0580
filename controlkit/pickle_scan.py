"""What a pickle would import and which instructions it uses, read from its bytes without running any of it.

Torch's weights-only unpickler refuses a pickle with one message for every reason (a function outside its
allowlist, an instruction it does not implement, a cut file) and ends it with advice to load the file unsafely.
This scan gives the reason instead: the globals the pickle names (GLOBAL, INST, and STACK_GLOBAL of the
protocols 4 and 5, whose names arrive as strings), the instructions outside the weights-only set, and whether the
stream is cut or damaged. `pickletools.genops` only decodes; at most `SCAN_LIMIT` bytes are read.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

#: Bytes of pickle data read at most: the pickles of real checkpoints are under a few MB (tensor data is apart).
SCAN_LIMIT = 64 * 2**20
#: Pickles at the start of a legacy torch file: magic number, protocol, system info, the object, storage keys.
LEGACY_PICKLES = 5
#: The instructions torch's weights-only unpickler implements (torch/_weights_only_unpickler.py); it refuses any
#: other, so a pickle using one was refused, not damaged.
WEIGHTS_ONLY_OPCODES = frozenset((
    "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK", "TUPLE", "TUPLE1",
    "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET",
    "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "BINPERSID", "LONG1", "PROTO",
    "STOP", "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT",
))
#: Python 2 module names that protocol 0-2 pickles use for builtins (Python 3 maps them when unpickling).
_PYTHON3_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


@dataclass
class PickleScan:
    """What a scan found.

    Attributes:
        globals: 'module.name' of every global the pickle names, in order of first use.
        unsupported: instructions outside WEIGHTS_ONLY_OPCODES, in order of first use.
        protocol: the highest PROTO declared (0 when none).
        damage: why the data could not be read to its end ('ends at byte N before its end mark'), or None.
        cut: the damage is that the data ends early (a names read just before the end may be cut short too).
    """

    globals: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    protocol: int = 0
    damage: str | None = None
    cut: bool = False


def scan_checkpoint(path: str | Path, zipped: bool) -> PickleScan:
    """Scan a torch checkpoint's pickles: the archive's data.pkl (`zipped`), or the pickles at the start of a
    legacy file (a raw pickle is one of them)."""
    path = Path(path)
    try:
        if zipped:
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
                with archive.open(name) as member:
                    data = member.read(SCAN_LIMIT)
            return scan_pickles(data, 1)
        with path.open("rb") as handle:
            return scan_pickles(handle.read(SCAN_LIMIT), LEGACY_PICKLES)
    except (OSError, StopIteration, zipfile.BadZipFile, EOFError, ValueError, RuntimeError):
        return PickleScan(damage="cannot be read from the archive")


def scan_pickles(data: bytes, count: int) -> PickleScan:
    """Scan up to `count` consecutive pickles in `data` (fewer when the data ends cleanly after one)."""
    scan = PickleScan()
    stream = io.BytesIO(data)
    for _ in range(count):
        start = stream.tell()
        if start == len(data):
            break
        try:
            _scan_one(stream, scan)
        except ValueError as error:  # pickletools' way of saying the bytes are cut or not instructions
            if "unknown" in str(error):
                scan.damage = "holds bytes that are not pickle instructions"
            elif len(data) >= SCAN_LIMIT:
                scan.damage = f"is longer than the {SCAN_LIMIT:,} bytes read"
            else:
                scan.damage, scan.cut = f"ends at byte {len(data):,} before its end mark", True
            break
    return scan


def _scan_one(stream: io.BytesIO, scan: PickleScan) -> None:
    recent: list[str | None] = []  # values pushed lately: STACK_GLOBAL takes its module and name from the top two
    memo: dict[int, str | None] = {}
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name not in WEIGHTS_ONLY_OPCODES and name not in scan.unsupported:
            scan.unsupported.append(name)
        if name == "PROTO":
            scan.protocol = max(scan.protocol, int(arg))
        elif name in ("GLOBAL", "INST"):
            module, _, attribute = str(arg).partition(" ")
            _add(scan, f"{_PYTHON3_NAMES.get(module, module)}.{attribute}")
        elif name == "STACK_GLOBAL":
            module, attribute = (recent[-2:] if len(recent) >= 2 else [None, None])
            _add(scan, f"{module}.{attribute}" if module and attribute else "an unnamed global (STACK_GLOBAL)")
        if name in _STRINGS:
            recent.append(arg if isinstance(arg, str) else None)
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            recent.append(memo.get(int(arg)))
        elif name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else int(arg)] = recent[-1] if recent else None
        elif opcode.stack_after:
            recent.append(None)
        del recent[:-2]
        if name == "STOP":
            return


def _add(scan: PickleScan, name: str) -> None:
    if name not in scan.globals:
        scan.globals.append(name)
