"""`controlkit dataset check|build`: find every bad pair before training; turn a folder of images into pairs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from controlkit.cli.annotate import add_engine_options, engine_arguments
from controlkit.cli.common import HelpFormatter, parse_assignments
from controlkit.errors import ControlkitError

if TYPE_CHECKING:
    from training.data.checks import CheckReport

EPILOG = """formats SOURCE may be:
  a JSONL manifest        {"image": "images/0.png", "condition": "conditions/0.png", "prompt": "..."} per line
  a fill50k prompt.json   {"source": ..., "target": ..., "prompt": ...} per line
  a folder layout         images/<stem>.png, conditions/<stem>.png, images/<stem>.txt (or captions.jsonl)
  a flat folder           photo.jpg + photo.txt (conditions computed with -p)
  a Hugging Face dataset  saved with save_to_disk; columns image, conditioning_image, text
  WebDataset shards       shards.json, a folder of .tar, pairs-{000000..000009}.tar; local or s3://, hf://, ...

examples:
  controlkit dataset check fill50k/prompt.json
  controlkit dataset check photos/ -p canny --json > report.json
  controlkit dataset build photos/ -p canny -o pairs/ --caption-from txt
  controlkit dataset build people/ -p pose -o pose-pairs/ --caption-from filename --workers 2
  controlkit dataset build photos/ -p canny -o shards/ --format webdataset --shard-size 1000 --engine ray
  controlkit dataset build laion/{00000..00099}.tar -p canny -o canny-shards/ --format webdataset
  controlkit dataset check shards/shards.json
"""

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from training.data.building import CAPTION_SOURCES

    parser = subparsers.add_parser(
        "dataset",
        help="check paired training data, or build pairs from a folder of images",
        description="`check` decodes every image and condition map of a dataset and reports every bad pair "
        "(missing file, corrupt or truncated image, image/condition size mismatch, empty caption) without "
        "training; exit status 1 if any. Blank condition maps (nothing detected) are listed as warnings. "
        "`build` annotates a folder of images with a preprocessor into condition maps plus a manifest.jsonl "
        "that training reads; re-running it resumes.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check", help="report every bad pair", formatter_class=HelpFormatter, epilog=EPILOG,
        description="Decode every pair of SOURCE and report each bad one; exit status 1 if any. A folder of images "
        "is searched recursively, as `dataset build` searches it.",
    )
    check.add_argument("source", metavar="SOURCE", help="manifest, prompt.json or folder (see the formats below)")
    check.add_argument("-p", "--preprocessor", help="condition maps will be computed with this preprocessor")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--workers", type=int, default=1, help="worker processes decoding images")
    _add_column_options(check)
    check.set_defaults(run=run_check)

    build = actions.add_parser(
        "build", help="annotate a folder of images into pairs", formatter_class=HelpFormatter, epilog=EPILOG,
        description="Annotate IMAGES_DIR (searched recursively) into OUT/conditions/ and write OUT/manifest.jsonl "
        "with image paths relative to OUT. Existing maps are kept (the run resumes) unless --overwrite. A pair "
        "without a caption is unusable (dataset check reports it, training skips it): images without one are "
        "listed, and a folder where no image has one is refused before any work. OUT is checked first: not a file, "
        "writable, outside IMAGES_DIR. --format webdataset writes tar shards (image, condition.png, txt, json per "
        "sample) and OUT/shards.json instead; IMAGES_DIR may then also be shards (e.g. img2dataset's), annotated "
        "shard by shard; finished shards are kept on a re-run.",
    )
    build.add_argument("images", metavar="IMAGES_DIR", help="folder of images (or, with --format webdataset, shards)")
    build.add_argument("-p", "--preprocessor", required=True, help="registry name (see `controlkit preprocessors`)")
    build.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    build.add_argument(
        "--set", action="append", metavar="KEY=VALUE", dest="params", help="preprocessor parameter (repeatable)"
    )
    build.add_argument(
        "--caption-from", choices=CAPTION_SOURCES, default="txt",
        help="captions from same-stem .txt files, or from file names (underscores and dashes become spaces)",
    )
    add_engine_options(build)
    build.add_argument("--format", choices=("folder", "webdataset"), default="folder",
                       help="folder: OUT/conditions + manifest.jsonl; webdataset: tar shards + OUT/shards.json")
    build.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (webdataset)")
    build.add_argument("--overwrite", action="store_true", help="recompute maps (or shards) that already exist")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(run=run_build)


def _add_column_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-column", default="image", help="Hugging Face dataset: target image column")
    parser.add_argument(
        "--conditioning-column", default="conditioning_image", help="Hugging Face dataset: condition column"
    )
    parser.add_argument("--caption-column", default="text", help="Hugging Face dataset: caption column")


def run_check(args: argparse.Namespace) -> int:
    from training.data.checks import check_pairs
    from training.data.dataset import load_pairs

    _check_workers(args.workers)
    if args.preprocessor is not None:
        _check_preprocessor_name(args.preprocessor)
    pairs = load_pairs(
        args.source, image_column=args.image_column, conditioning_column=args.conditioning_column,
        caption_column=args.caption_column,
    )
    report = check_pairs(
        pairs, conditions_computed=args.preprocessor is not None, workers=args.workers, progress=not args.json
    )
    if args.json:
        print(json.dumps({
            "source": str(args.source), "pairs": report.pairs, "bad": len(report.bad), "problems": report.counts,
            "bad_pairs": [{"key": key, "problems": found} for key, found in report.bad],
            "warnings": [{"key": key, "warnings": found} for key, found in report.warned],
        }, indent=2))
    else:
        _print_check(args.source, report)
    return 0 if report.ok else 1


def _print_check(source: str, report: CheckReport) -> None:
    for key, found in report.bad:
        for problem in found:
            print(f"{key}: {problem}")
    for key, found in report.warned:
        for warning in found:
            print(f"{key}: warning: {warning}")
    summary = ", ".join(f"{count} {name}" for name, count in report.summary())
    print(
        f"{source}: {report.pairs} pairs, {len(report.bad)} bad" + (f" ({summary})" if summary else "")
        + (f"; {len(report.warned)} with warnings" if report.warned else "")
    )


def run_build(args: argparse.Namespace) -> int:
    from controlkit.files import check_output_folder
    from training.data.building import build_dataset

    _check_workers(args.workers)
    engine = engine_arguments(args)
    _check_preprocessor_name(args.preprocessor)
    if args.format == "webdataset":
        return _build_shards(args, engine)
    if not Path(args.images).is_dir():
        raise argparse.ArgumentTypeError(f"IMAGES_DIR must be a folder, got {Path(args.images)}")
    if Path(args.output).resolve().is_relative_to(Path(args.images).resolve()):
        raise argparse.ArgumentTypeError(f"-o {args.output} lies inside IMAGES_DIR {args.images}: its maps would "
                                         "be read as images the next time; choose a folder outside it")
    check_output_folder(args.output, "-o")  # a file, a path under one, no permission: before any work
    try:
        built = build_dataset(
            args.images, args.preprocessor, args.output, params=parse_assignments(args.params, "--set"),
            overwrite=args.overwrite, caption_from=args.caption_from, progress=not args.quiet, **engine,
        )
    except ControlkitError:  # the data's problem (e.g. no captions), not the command line's: exit status 1
        raise
    except (ValueError, TypeError) as error:  # an unknown preprocessor parameter: a usage error
        raise argparse.ArgumentTypeError(str(error)) from None
    report, uncaptioned = built.annotation, built.uncaptioned
    for source, reason in report.failed:
        print(f"failed: {reason if str(source) in reason else f'{source}: {reason}'}", file=sys.stderr)
    for source in uncaptioned[:10]:
        text = source.with_suffix(".txt")
        fix = f"re-save {text.name} as UTF-8" if text.exists() else f"write {text.name}"
        print(f"no caption: {source} ({fix})", file=sys.stderr)
    if len(uncaptioned) > 10:
        print(f"no caption: {len(uncaptioned) - 10} more", file=sys.stderr)
    print(
        f"{args.preprocessor}: {len(report.written)} maps written, {len(report.skipped)} already there, "
        f"{len(report.failed)} failed; {built.manifest}: {len(built.records)} pairs"
        + (f", {len(uncaptioned)} without caption (dataset check reports them and training skips them until "
           "they have one: add the captions and run build again)" if uncaptioned else "")
    )
    return 0 if built.ok else 1


def _build_shards(args: argparse.Namespace, engine: dict) -> int:
    from controlkit.errors import preview
    from training.data.shard_writer import build_shards

    if args.shard_size < 1:
        raise argparse.ArgumentTypeError(f"--shard-size must be at least 1, got {args.shard_size}")
    try:
        report = build_shards(args.images, args.preprocessor, args.output,
                              params=parse_assignments(args.params, "--set"), shard_size=args.shard_size,
                              caption_from=args.caption_from, overwrite=args.overwrite, progress=not args.quiet,
                              **engine)
    except ControlkitError:
        raise
    except (ValueError, TypeError) as error:  # an unknown preprocessor parameter: a usage error
        raise argparse.ArgumentTypeError(str(error)) from None
    for _, reason in report.failed:
        print(f"failed: {reason}", file=sys.stderr)
    for name in report.uncaptioned[:10]:
        print(f"no caption: {name}", file=sys.stderr)
    if report.stopped:
        print(f"stopped: {report.stopped}; {len(report.not_started)} shard(s) not written: fix the output and run "
              "the same command again to resume", file=sys.stderr)
    empty = f" ({len(report.empty)} with empty maps: {preview([name for name, _ in report.empty])})" \
        if report.empty else ""
    print(f"{args.preprocessor}: {len(report.written)} shards written, {len(report.skipped)} already there, "
          f"{len(report.failed)} failed{empty}; {report.index}: {report.samples} samples"
          + (f", {len(report.uncaptioned)} without caption" if report.uncaptioned else ""))
    return 0 if report.ok else 1


def _check_workers(workers: int) -> None:
    from training.config_rules import MAX_WORKERS

    if not 1 <= workers <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"--workers must be in [1, {MAX_WORKERS}], got {workers}")


def _check_preprocessor_name(name: str) -> None:
    from preprocessors.registry import get_spec

    try:
        get_spec(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
