"""`controlkit annotate`: images and folders in, condition maps (PNG) out."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from controlkit.cli.common import HelpFormatter, parse_assignments
from controlkit.errors import ControlkitError, preview

if TYPE_CHECKING:
    from preprocessors.batch import AnnotateReport

EPILOG = """examples:
  controlkit annotate photo.jpg -p canny -o maps/
  controlkit annotate photos/ -p softedge --set safe=true --workers 2 -o maps/softedge
  controlkit annotate people/ -p pose --json -o poses/      # also writes OpenPose JSON keypoints
  controlkit annotate photos/ -p canny --engine ray --workers 2 -o maps/            # a local Ray
  controlkit annotate /shared/photos -p depth --engine ray --address auto --workers 16 --gpus-per-worker 0.5 \
      -o /shared/maps                                       # a running Ray cluster; paths on shared storage
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "annotate",
        help="turn images into condition maps with a preprocessor",
        description="Annotate image files and folders (searched recursively, the output folder excepted) with one "
        "preprocessor. Maps are lossless PNGs named after the inputs, at their paths relative to the folder that "
        "holds all inputs; existing maps are skipped unless --overwrite, so an interrupted run resumes. A bad or "
        "missing input, or a worker killed on a file, is reported and the rest annotated; a map that cannot be "
        "written stops the run. Maps where nothing was found (pose: no person) are listed. Exit status 1 if any "
        "input failed.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    parser.add_argument("-p", "--preprocessor", required=True, help="registry name (see `controlkit preprocessors`)")
    parser.add_argument("-o", "--output", default="maps", help="output folder")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", dest="params", help="preprocessor parameter (repeatable)"
    )
    parser.add_argument("--json", action="store_true", help="also write OpenPose JSON keypoints (pose)")
    add_engine_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="recompute maps that already exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """--workers, --engine, --address, --gpus-per-worker (annotate and dataset build)."""
    parser.add_argument("--workers", type=int, default=1, help="worker processes (Ray engine: actors)")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: worker processes here; ray: a Ray Data pipeline (pip install controlkit[ray])")
    parser.add_argument("--address", default=None, metavar="ADDR",
                        help="Ray engine: the cluster to join ('auto': the one running here); default: a local "
                        "Ray that starts and stops with the command")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                        help="Ray engine: GPUs each actor reserves (0.5: two actors share a GPU)")


def engine_arguments(args: argparse.Namespace) -> dict:
    """The engine keyword arguments of `annotate_paths` / `build_dataset`, checked (usage errors; --workers is
    checked by each command)."""
    if args.engine != "ray" and (args.address is not None or args.gpus_per_worker):
        raise argparse.ArgumentTypeError("--address and --gpus-per-worker need --engine ray")
    if not args.gpus_per_worker >= 0:
        raise argparse.ArgumentTypeError(f"--gpus-per-worker must be 0 or positive, got {args.gpus_per_worker}")
    return {"workers": args.workers, "engine": args.engine, "address": args.address,
            "gpus_per_worker": args.gpus_per_worker}


def run(args: argparse.Namespace) -> int:
    from preprocessors.batch import annotate_paths, progress_bar

    if args.workers < 1:
        raise argparse.ArgumentTypeError(f"--workers must be at least 1, got {args.workers}")
    engine = engine_arguments(args)
    params = parse_assignments(args.params, "--set")
    try:
        report = annotate_paths(
            args.inputs, args.preprocessor, args.output, params=params, overwrite=args.overwrite,
            keypoints=args.json, progress=None if args.quiet else progress_bar, **engine,
        )
    except ControlkitError:
        raise
    except (ValueError, TypeError) as error:  # unknown preprocessor or parameter, a value of the wrong type
        raise argparse.ArgumentTypeError(str(error)) from None
    for _, reason in report.failed:
        print(f"failed: {reason}", file=sys.stderr)
    if report.stopped and report.not_started:
        print(f"stopped: a map could not be written, so {len(report.not_started)} input(s) were not started; "
              "fix the output and run the same command again to resume", file=sys.stderr)
    print(_summary(args.preprocessor, report, args.output))
    return 0 if report.ok else 1


def _summary(name: str, report: AnnotateReport, output: str) -> str:
    """'canny: 3 written, 1 already there (skipped), 0 failed -> maps', with the empty maps by reason."""
    empty: dict[str, list[str]] = {}
    for path, reason in report.empty:
        empty.setdefault(reason, []).append(str(path))
    notes = "".join(f" ({len(paths)} with {reason}: {preview(paths)})" for reason, paths in empty.items())
    stopped = f", {len(report.not_started)} not started" if report.not_started else ""
    return (f"{name}: {len(report.written)} written{notes}, {len(report.skipped)} already there (skipped), "
            f"{len(report.failed)} failed{stopped} -> {output}")
