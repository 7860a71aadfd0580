"""`controlkit convert`: a ControlNet checkpoint from any supported format to a diffusers folder or to one
original-format (A1111/ComfyUI) .safetensors file, with its condition metadata."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from controlkit.cli.common import HelpFormatter, parse_assignments
from controlkit.errors import ConfigError

EPILOG = """examples:
  controlkit convert control_v11p_sd15_canny.pth canny-diffusers --to diffusers
  controlkit convert canny-diffusers control_canny.safetensors --to original --dtype float16
  controlkit convert my-controlnet/ my_depth.safetensors --to original --condition depth --preprocessor depth
  controlkit convert control_sd15_openpose.pth openpose/ --to diffusers --set detect_resolution=512
"""

DTYPES = ("keep", "float32", "float16", "bfloat16")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a ControlNet between diffusers and the original (A1111/ComfyUI) format",
        description="Read a ControlNet (diffusers folder, diffusers or original .safetensors, original .pth/.ckpt "
        "read without running code) and write it as a diffusers folder or one original-format .safetensors "
        "file. Condition metadata (condition, preprocessor and its parameters) is kept and can be set here. "
        "With --dtype keep, tensors are copied bit for bit.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("source", metavar="SRC", help="checkpoint file or diffusers folder")
    parser.add_argument("destination", metavar="DST",
                        help="folder (--to diffusers) or .safetensors file (--to original; a folder gets SRC's name)")
    parser.add_argument("--to", required=True, choices=("diffusers", "original"), help="output format")
    parser.add_argument("--condition", help="condition name to record, e.g. canny, depth, openpose")
    parser.add_argument("--preprocessor", help="preprocessor (registry name) that makes this ControlNet's maps")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", dest="params",
                        help="preprocessor parameter to record (repeatable)")
    parser.add_argument("--base", help="base model or family it was trained on, e.g. SD1.x")
    parser.add_argument("--dtype", choices=DTYPES, default="keep", help="tensor type of the output")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from controlkit.checkpoint import load_controlnet, save_controlnet

    params = parse_assignments(args.params, "--set")
    destination = _destination(Path(args.source), Path(args.destination), args.to, args.overwrite)
    dtype = None if args.dtype == "keep" else _torch_dtype(args.dtype)
    controlnet, metadata = load_controlnet(args.source, torch_dtype=dtype)
    updates = {"condition": args.condition, "preprocessor": args.preprocessor, "base": args.base}
    metadata = replace(metadata, **{key: value for key, value in updates.items() if value is not None})
    if params:
        metadata = replace(metadata, preprocessor_params={**metadata.preprocessor_params, **params})
    written = save_controlnet(controlnet, destination, metadata, original=args.to == "original")
    tensors = len(controlnet.state_dict())
    dtype_name = str(next(controlnet.parameters()).dtype).replace("torch.", "")
    print(f"wrote {written} ({args.to} format, {tensors} tensors, {dtype_name}, condition: {metadata.condition})")
    return 0


def _destination(source: Path, destination: Path, to: str, overwrite: bool) -> Path:
    if to == "original" and destination.is_dir():
        destination = destination / f"{source.name.split('.')[0]}.safetensors"
    if to == "original" and destination.suffix.lower() != ".safetensors":
        raise ConfigError(f"{destination}: the original format is one file; give a path ending in .safetensors")
    exists = destination.is_file() or (destination.is_dir() and any(destination.iterdir()))
    if exists and not overwrite:
        raise ConfigError(f"{destination} already exists; pass --overwrite to replace it")
    if to == "diffusers" and destination.is_file():
        raise ConfigError(f"{destination} is a file; --to diffusers writes a folder")
    return destination


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)
