"""Helpers shared by subcommands: the base and device flags, parsing `key=value` options and `NAME=VALUE` pairs,
and notes."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from controlkit.devices import AUTO, DTYPE_NAMES
from preprocessors.registry import parse_param_value

#: --dtype choices: auto (float16 on GPU, float32 on CPU) or a dtype name.
DTYPES = (AUTO, *DTYPE_NAMES)


def add_base_flags(parser: argparse.ArgumentParser) -> None:
    """--base (required) and --base-config, as every command that generates takes them."""
    parser.add_argument("--base", required=True,
                        help="diffusers folder or single-file checkpoint of the base, or demo (the shipped demo base)")
    parser.add_argument("--base-config", help="for a single-file base: a diffusers folder with its config files")


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype."""
    parser.add_argument("--device", default=None, help="torch device (cpu, cuda, cuda:N, mps); cuda if available, "
                        "else cpu")
    parser.add_argument("--dtype", default=AUTO, choices=DTYPES, help="auto: float16 on GPU, float32 on CPU")


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
