"""The `controlkit` command: one small module per subcommand, each with `add_parser(subparsers)` and
`run(args) -> int`.

Exit status: 0 success, 1 a user-fixable error (one line on stderr, no traceback) or a partly failed run,
2 a usage error (argparse). Notes (a size far from what the base was made for) are `note: ...` lines on stderr.
Commands that run models set torch's CPU threads first (`controlkit.devices.cpu_threads_for_run`, `--threads`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from controlkit.errors import ControlkitError

#: Subcommand modules under controlkit.cli, in the order `--help` lists them.
COMMANDS = (
    "demo", "annotate", "preprocessors", "generate", "upscale", "convert", "info", "dataset", "eval", "train", "ui",
)
#: Commands that never run a model, so they skip choosing torch's thread count.
NO_MODELS = ("preprocessors",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlkit",
        description="Spatial control of Stable Diffusion with ControlNet: annotate, generate, train.",
        epilog="Run `controlkit COMMAND --help` for the options and examples of each command.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument(
        "--threads", type=_positive, default=None, metavar="N",
        help="torch CPU threads (default: $OMP_NUM_THREADS if set, else the cores other processes leave free: "
        "torch's one-thread-per-core default collapses on a busy machine)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"controlkit.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    from controlkit.cli.common import notes
    from controlkit.devices import cpu_threads_for_run

    args = build_parser().parse_args(argv)
    try:
        if args.command in NO_MODELS:
            return int(args.run(args))
        with cpu_threads_for_run(args.threads), notes():
            return int(args.run(args))
    except argparse.ArgumentTypeError as error:  # a malformed KEY=VALUE option found after parsing
        print(f"controlkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ControlkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _version() -> str:
    from controlkit import __version__

    return f"controlkit {__version__}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
