"""`controlkit dataset check|build`: find every bad pair before training; turn a folder of images into pairs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from controlkit.cli.common import HelpFormatter, parse_assignments

EPILOG = """formats SOURCE may be:
  a JSONL manifest        {"image": "images/0.png", "condition": "conditions/0.png", "prompt": "..."} per line
  a fill50k prompt.json   {"source": ..., "target": ..., "prompt": ...} per line
  a folder layout         images/<stem>.png, conditions/<stem>.png, images/<stem>.txt (or captions.jsonl)
  a flat folder           photo.jpg + photo.txt (conditions computed with -p)
  a Hugging Face dataset  saved with save_to_disk; columns image, conditioning_image, text

examples:
  controlkit dataset check fill50k/prompt.json
  controlkit dataset check photos/ -p canny --json > report.json
  controlkit dataset build photos/ -p canny -o pairs/ --caption-from txt
  controlkit dataset build people/ -p pose -o pose-pairs/ --caption-from filename --workers 2
"""

#: Report categories, in the order the summary lists them, matched on the problem's text.
CATEGORIES = (
    ("missing file", "no such file"),
    ("size mismatch", "size mismatch"),
    ("empty caption", "empty caption"),
    ("no condition", "no condition map"),
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
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
        description="Decode every pair of SOURCE and report each bad one; exit status 1 if any.",
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
        "with image paths relative to OUT. Existing maps are kept (the run resumes) unless --overwrite.",
    )
    build.add_argument("images", metavar="IMAGES_DIR", help="folder of images")
    build.add_argument("-p", "--preprocessor", required=True, help="registry name (see `controlkit preprocessors`)")
    build.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    build.add_argument(
        "--set", action="append", metavar="KEY=VALUE", dest="params", help="preprocessor parameter (repeatable)"
    )
    build.add_argument(
        "--caption-from", choices=("txt", "filename"), default="txt",
        help="captions from same-stem .txt files, or from file names (underscores and dashes become spaces)",
    )
    build.add_argument("--workers", type=int, default=1, help="worker processes")
    build.add_argument("--overwrite", action="store_true", help="recompute maps that already exist")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(run=run_build)


def _add_column_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-column", default="image", help="Hugging Face dataset: target image column")
    parser.add_argument(
        "--conditioning-column", default="conditioning_image", help="Hugging Face dataset: condition column"
    )
    parser.add_argument("--caption-column", default="text", help="Hugging Face dataset: caption column")


def run_check(args: argparse.Namespace) -> int:
    from training.data.dataset import load_pairs

    _check_workers(args.workers)
    if args.preprocessor is not None:
        _check_preprocessor_name(args.preprocessor)
    pairs = load_pairs(
        args.source, image_column=args.image_column, conditioning_column=args.conditioning_column,
        caption_column=args.caption_column,
    )
    computed = args.preprocessor is not None
    checks = _check_all(pairs, computed, args.workers, progress=not args.json)
    bad = [(pair.key, check.problems) for pair, check in zip(pairs, checks) if check.problems]
    warned = [(pair.key, check.warnings) for pair, check in zip(pairs, checks) if check.warnings]
    counts = Counter(_category(problem) for _, found in bad for problem in found)
    if args.json:
        report = {
            "source": str(args.source), "pairs": len(pairs), "bad": len(bad), "problems": dict(counts),
            "bad_pairs": [{"key": key, "problems": found} for key, found in bad],
            "warnings": [{"key": key, "warnings": found} for key, found in warned],
        }
        print(json.dumps(report, indent=2))
    else:
        for key, found in bad:
            for problem in found:
                print(f"{key}: {problem}")
        for key, found in warned:
            for warning in found:
                print(f"{key}: warning: {warning}")
        summary = ", ".join(f"{count} {name}" for name, count in _ordered(counts))
        print(
            f"{args.source}: {len(pairs)} pairs, {len(bad)} bad" + (f" ({summary})" if summary else "")
            + (f"; {len(warned)} with warnings" if warned else "")
        )
    return 1 if bad else 0


def _check_all(pairs: list, computed: bool, workers: int, *, progress: bool) -> list:
    """`check_pair` over every pair, in order, in `workers` processes."""
    from functools import partial

    from training.data.dataset import check_pair

    check = partial(check_pair, conditions_computed=computed)
    if workers <= 1 or len(pairs) <= 1:
        results: Any = map(check, pairs)
        executor = None
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        results = executor.map(check, pairs, chunksize=max(1, min(64, len(pairs) // (4 * workers))))
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=len(pairs), unit="pair", file=sys.stderr, disable=len(pairs) < 100)
    try:
        return list(results)
    finally:
        if executor is not None:
            executor.shutdown()


def _category(problem: str) -> str:
    for name, marker in CATEGORIES:
        if marker in problem:
            return name
    return "corrupt image"


def _ordered(counts: Counter) -> list[tuple[str, int]]:
    order = [name for name, _ in CATEGORIES[:1]] + ["corrupt image"] + [name for name, _ in CATEGORIES[1:]]
    return [(name, counts[name]) for name in order if counts[name]]


def run_build(args: argparse.Namespace) -> int:
    from preprocessors.batch import annotate_paths, plan_jobs
    from preprocessors.registry import get_spec

    _check_workers(args.workers)
    _check_preprocessor_name(args.preprocessor)
    images, output = Path(args.images), Path(args.output)
    if not images.is_dir():
        raise argparse.ArgumentTypeError(f"IMAGES_DIR must be a folder, got {images}")
    conditions = output / "conditions"
    keypoints = hasattr(get_spec(args.preprocessor).load_class(), "keypoints")  # pose: keep the JSON too
    try:
        report = annotate_paths(
            [images], args.preprocessor, conditions, params=parse_assignments(args.params, "--set"),
            workers=args.workers, overwrite=args.overwrite, keypoints=keypoints,
            progress=None if args.quiet else _progress,
        )
    except (ValueError, TypeError) as error:  # an unknown preprocessor parameter: a usage error
        raise argparse.ArgumentTypeError(str(error)) from None
    failed = {Path(source) for source, _ in report.failed}
    records, uncaptioned = [], []
    for job in plan_jobs([images], conditions, keypoints=keypoints):
        if job.source in failed:
            continue
        prompt = _caption(job.source, args.caption_from)
        if not prompt:
            uncaptioned.append(job.source)
        records.append({
            "image": Path(os.path.relpath(job.source, output)).as_posix(),
            "condition": job.output.relative_to(output).as_posix(),
            "prompt": prompt,
        })
    _write_manifest(output / "manifest.jsonl", records)
    for source, reason in report.failed:
        print(f"failed: {reason if str(source) in reason else f'{source}: {reason}'}", file=sys.stderr)
    for source in uncaptioned[:10]:
        print(f"no caption: {source} (write {source.with_suffix('.txt').name})", file=sys.stderr)
    if len(uncaptioned) > 10:
        print(f"no caption: {len(uncaptioned) - 10} more", file=sys.stderr)
    print(
        f"{args.preprocessor}: {len(report.written)} maps written, {len(report.skipped)} already there, "
        f"{len(report.failed)} failed; {output / 'manifest.jsonl'}: {len(records)} pairs"
        + (f", {len(uncaptioned)} without caption" if uncaptioned else "")
    )
    return 0 if report.ok else 1


def _caption(image: Path, source: str) -> str:
    if source == "filename":
        return " ".join(image.stem.replace("_", " ").replace("-", " ").split())
    try:
        return image.with_suffix(".txt").read_text(encoding="utf-8").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return ""


def _write_manifest(path: Path, records: list[dict[str, str]]) -> None:
    """All lines at once, through a temporary file renamed into place (never a half-written manifest)."""
    from controlkit.files import write_bytes_atomic

    write_bytes_atomic(path, "".join(json.dumps(record) + "\n" for record in records).encode("utf-8"))


def _check_workers(workers: int) -> None:
    if workers < 1:
        raise argparse.ArgumentTypeError(f"--workers must be at least 1, got {workers}")


def _check_preprocessor_name(name: str) -> None:
    from preprocessors.registry import get_spec

    try:
        get_spec(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _progress(results, total):
    from tqdm import tqdm

    return tqdm(results, total=total, unit="img", file=sys.stderr, disable=total == 0)
