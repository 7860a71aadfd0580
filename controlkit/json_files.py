"""Reading JSON from untrusted files (configs, sharded-checkpoint indexes, safetensors headers and metadata) with
its size and nesting bounded, so that a hostile document is one line, never a RecursionError or a memory spike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from controlkit.errors import CheckpointError

#: Largest JSON file read (config.json, an index): configs are a few KB, SDXL's U-Net index about 150 KB.
MAX_JSON_BYTES = 16 * 2**20
#: Deepest JSON nesting accepted: configs, indexes, headers and condition metadata are 2 to 4 levels deep.
MAX_JSON_DEPTH = 32
_REAL_DEPTH = " (real configs, indexes and headers are a few levels deep)"


def parse_json_object(text: str | bytes, what: str, *, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """A JSON object from untrusted text, with its nesting bounded.

    Args:
        text: the document (bytes are decoded as UTF-8).
        what: its name in messages, e.g. 'models/cn/config.json'.

    Raises:
        CheckpointError: one line: not UTF-8, not JSON (with the position), nested deeper than `max_depth`, or
            not an object. The message never quotes the document.
    """
    try:
        value = json.loads(text)
    except RecursionError:  # json's decoder stops at Python's recursion limit: far past any real document
        raise CheckpointError(f"{what} is nested more than {max_depth} levels deep{_REAL_DEPTH}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{what} is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{what} is not valid JSON ({error.msg} at line {error.lineno} column "
                              f"{error.colno})") from None
    except ValueError:  # e.g. an integer of more digits than Python converts
        raise CheckpointError(f"{what} is not valid JSON (a number out of range)") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} is not a JSON object")
    if _depth(value) > max_depth:
        raise CheckpointError(f"{what} is nested more than {max_depth} levels deep{_REAL_DEPTH}")
    return value


def read_json_file(path: str | os.PathLike, what: str | None = None, *,
                   max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """`parse_json_object` of a file, refused by its size before anything is read (`what` defaults to the path).

    Raises:
        CheckpointError: larger than `max_bytes`, unreadable, or see `parse_json_object`.
    """
    path = Path(path)
    what = what or str(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise CheckpointError(f"{what} is {size:,} bytes, more than the {max_bytes:,} a JSON config or index "
                                  "may have; it is not one")
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{what} cannot be read ({error.strerror or type(error).__name__})") from None
    return parse_json_object(data, what)


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest
