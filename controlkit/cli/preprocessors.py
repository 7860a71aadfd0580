"""`controlkit preprocessors`: every registry entry, whether it is ready here or what it needs, its license."""

from __future__ import annotations

import argparse

from controlkit.cli.common import HelpFormatter


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preprocessors",
        help="list preprocessors, whether each is ready here, and licenses",
        description="List every preprocessor: whether it runs on this machine with its defaults (or exactly "
        "what to supply), where its weights come from, its parameters and its license.",
        epilog="example:\n  controlkit preprocessors --verbose",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="also show parameters, their types and defaults")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from preprocessors.registry import PREPROCESSORS

    for name, spec in sorted(PREPROCESSORS.items()):
        missing = spec.check_ready()
        status = "ready" if missing is None else f"needs: {missing}"
        print(f"{name:10s} {status}")
        print(f"{'':10s} {spec.summary}")
        print(f"{'':10s} weights: {spec.weights}; license: {spec.license}")
        if args.verbose:
            print(f"{'':10s} parameters: {_parameters(spec)}")
    return 0


def _parameters(spec) -> str:
    """'low_threshold: int = 100, ...': each parameter with the type `--set` values are checked against."""
    try:
        defaults, types = spec.parameters(), spec.parameter_types()
    except ImportError as error:
        return f"unknown ({error})"
    return ", ".join(
        f"{key}{f': {types[key]}' if types[key] else ''} = {value!r}" for key, value in defaults.items()
    ) or "none"
