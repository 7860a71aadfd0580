"""`controlkit convert`: a ControlNet checkpoint from any supported format to a diffusers folder or to one
original-format (A1111/ComfyUI) .safetensors file, with its condition metadata."""

from __future__ import annotations

import argparse

from controlkit.cli.common import HelpFormatter, parse_assignments
from controlkit.devices import DTYPE_NAMES

EPILOG = """examples:
  controlkit convert control_v11p_sd15_canny.pth canny-diffusers --to diffusers
  controlkit convert canny-diffusers control_canny.safetensors --to original --dtype float16
  controlkit convert my-controlnet/ my_depth.safetensors --to original --condition depth --preprocessor depth
  controlkit convert control_sd15_openpose.pth openpose/ --to diffusers --set detect_resolution=512
  controlkit convert tiny-controlnet/ tiny.safetensors --to original --force   # a layout A1111/ComfyUI cannot load

--to original writes what A1111 and ComfyUI read: only the SD1.x, SD2.x and SDXL layouts (others need --force),
a shuffle (global pooling) ControlNet under a name ending in _shuffle (they decide pooling from the name), and a
BGR ControlNet's hint encoder flipped to the RGB they feed. A ControlNet-Union has no original layout (they read
its diffusers file), so it converts --to diffusers only; a Control-LoRA needs its base's U-Net to load, which
convert does not take.
"""

DTYPES = ("keep", *DTYPE_NAMES)


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
    parser.add_argument("--force", action="store_true",
                        help="--to original: write a layout A1111 and ComfyUI cannot load (only controlkit and "
                        "diffusers read it)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from controlkit.conversion import convert_controlnet
    from controlkit.devices import torch_dtype

    params = parse_assignments(args.params, "--set")
    result = convert_controlnet(
        args.source, args.destination, original=args.to == "original",
        torch_dtype=None if args.dtype == "keep" else torch_dtype(args.dtype), condition=args.condition,
        preprocessor=args.preprocessor, preprocessor_params=params, base=args.base, overwrite=args.overwrite,
        force=args.force,
    )
    line = (f"wrote {result.path} ({args.to} format, {result.tensor_count} tensors, {result.dtype}, "
            f"condition: {result.metadata.condition})")
    if args.to == "original":
        line += "; " + "; ".join((f"readable by A1111/ComfyUI: {result.clients}", *result.notes))
    print(line)
    return 0
