"""Helpers shared by subcommands: parsing `key=value` options and `NAME=VALUE` pairs."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the epilog's example commands on their own lines."""


def parse_value(text: str) -> Any:
    """A `--set` value: JSON literals (numbers, true/false, null, lists) or else the plain string."""
    lowered = text.strip()
    if lowered.lower() in ("true", "false"):
        return lowered.lower() == "true"
    if lowered.lower() in ("none", "null"):
        return None
    try:
        return json.loads(lowered)
    except json.JSONDecodeError:
        return text


def parse_assignments(items: Sequence[str] | None, option: str) -> dict[str, Any]:
    """['low_threshold=50', 'safe=true'] -> {'low_threshold': 50, 'safe': True}; bad items raise usage errors."""
    result: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{option} expects KEY=VALUE, got {item!r}")
        result[key.strip()] = parse_value(value)
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
