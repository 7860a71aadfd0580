"""`controlkit annotate`: images and folders in, condition maps (PNG) out."""

from __future__ import annotations

import argparse
import sys

from controlkit.cli.common import HelpFormatter, parse_assignments

EPILOG = """examples:
  controlkit annotate photo.jpg -p canny -o maps/
  controlkit annotate photos/ -p softedge --set safe=true --workers 2 -o maps/softedge
  controlkit annotate people/ -p pose --json -o poses/      # also writes OpenPose JSON keypoints
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "annotate",
        help="turn images into condition maps with a preprocessor",
        description="Annotate image files and folders (searched recursively) with one preprocessor. Maps are "
        "lossless PNGs named after the inputs; existing maps are skipped unless --overwrite, so an interrupted "
        "run resumes. Bad files are reported and skipped. Exit status 1 if any input failed.",
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
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--overwrite", action="store_true", help="recompute maps that already exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from preprocessors.batch import annotate_paths, progress_bar

    if args.workers < 1:
        raise argparse.ArgumentTypeError(f"--workers must be at least 1, got {args.workers}")
    params = parse_assignments(args.params, "--set")
    try:
        report = annotate_paths(
            args.inputs, args.preprocessor, args.output, params=params, workers=args.workers,
            overwrite=args.overwrite, keypoints=args.json, progress=None if args.quiet else progress_bar,
        )
    except (ValueError, TypeError) as error:  # unknown preprocessor or parameter: a usage error
        raise argparse.ArgumentTypeError(str(error)) from None
    for source, reason in report.failed:
        print(f"failed: {reason if str(source) in reason else f'{source}: {reason}'}", file=sys.stderr)
    print(
        f"{args.preprocessor}: {len(report.written)} written, {len(report.skipped)} already there (skipped), "
        f"{len(report.failed)} failed -> {args.output}"
    )
    return 0 if report.ok else 1

