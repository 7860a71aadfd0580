"""Helpers shared by subcommands: parsing `key=value` options and `NAME=VALUE` pairs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
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
