"""`controlkit demo`: the whole toolkit on offline material, in seconds."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from controlkit.cli.common import HelpFormatter


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="annotate a bundled photo with every preprocessor that can run here",
        description="Annotate a photo that ships with the installed packages with every preprocessor that "
        "is ready on this machine, write the maps as PNGs, and say for the others exactly what to supply.",
        epilog="example:\n  controlkit demo -o out/demo",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-o", "--output", default="out/demo", help="output folder")
    parser.add_argument("--photo", default="astronaut", help="bundled sample photo (controlkit.samples)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from controlkit.image import to_pil
    from controlkit.samples import sample_photo
    from preprocessors.registry import PREPROCESSORS, get_preprocessor

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    photo = sample_photo(args.photo)
    to_pil(photo).save(output / f"{args.photo}.png")
    print(f"photo: {args.photo} {photo.shape[1]}x{photo.shape[0]} -> {output / (args.photo + '.png')}")
    for name, spec in sorted(PREPROCESSORS.items()):
        missing = spec.readiness()
        if missing is not None:
            print(f"  {name:9s} skipped: {missing}")
            continue
        start = time.perf_counter()
        condition = get_preprocessor(name)(photo)
        condition.save(output / f"{args.photo}_{name}.png")
        print(f"  {name:9s} {time.perf_counter() - start:6.2f} s -> {output / f'{args.photo}_{name}.png'}")
    return 0
