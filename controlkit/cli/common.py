"""Helpers shared by subcommands: parsing `key=value` options and `NAME=VALUE` pairs, and notes."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from preprocessors.registry import parse_param_value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the epilog's example commands on their own lines."""


def parse_assignments(items: Sequence[str] | None, option: str) -> dict[str, Any]:
    """['low_threshold=50', 'safe=true'] -> {'low_threshold': 50, 'safe': True}; bad items raise usage errors."""
    result: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{option} expects KEY=VALUE, got {item!r}")
        result[key.strip()] = parse_param_value(value)
    return result


def parse_named(items: Sequence[str] | None, option: str) -> dict[str, str]:
    """['canny=edges.png'] -> {'canny': 'edges.png'} (values kept as strings)."""
    result: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise argparse.ArgumentTypeError(f"{option} expects NAME=VALUE, got {item!r}")
        result[key.strip()] = value
    return result


@contextmanager
def notes() -> Iterator[None]:
    """Within the block, the library's `GenerationWarning`s (a size far from what the base was made for) are one
    `note: ...` line each on stderr, printed when they happen and each distinct one once (an evaluation generates
    many times at one size); other warnings are shown as usual."""
    from controlkit.generation_options import GenerationWarning

    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("always", GenerationWarning)
        shown = warnings.showwarning

        def show(message: Any, category: type, *rest: Any, **options: Any) -> None:
            if not issubclass(category, GenerationWarning):
                shown(message, category, *rest, **options)
            elif str(message) not in seen:
                seen.add(str(message))
                print(f"note: {message}", file=sys.stderr, flush=True)

        warnings.showwarning = show
        yield
