"""The plumbing every examples/<condition>.py script shares, so that each script shows only its lesson: image ->
preprocessor -> `Control` -> `generate` -> save.

- `parse_args(condition, description, argv)`: the standard flags (IMAGE, --base, --controlnet, --set KEY=VALUE,
  --prompt, --seed, --steps, --guidance, --toy-seed, -o), and a script's own (`extra_flags`).
- `load_models(condition, args)`: the embedded demo base and demo ControlNet, or --base and --controlnet.
- `load_input(condition, args)`: the input image at the size to generate at, with its prompt (`ExampleInput`).
- `save_panels(images, path)`: the images side by side in one PNG.
- `run(main)`: a script's `main` with user errors as one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from controlkit.errors import ConfigError, ControlkitError
from preprocessors.registry import parse_param_value

if TYPE_CHECKING:
    from diffusers import ControlNetModel, StableDiffusionPipeline

#: The prompt for your own models when no --prompt is given (the demo base knows only toy-world words).
PHOTO_PROMPT = "a high quality, detailed photograph"

EPILOG = """which input, which models:
  no IMAGE, demo models    a held-out toy-world render (--toy-seed) with its caption; pose, depth and normal use
                           the toy world's exact maps (no depth or normal model ships offline; with --set, the
                           preprocessor instead), the edges their preprocessor
  your IMAGE               annotated by the preprocessor the ControlNet's metadata names, with --set parameters
                           over its own; with the demo models it is first resized to 64 x 64 pixels
  --base and --controlnet  your checkpoints; no IMAGE: a bundled photo; the output has the image's size, sides
                           rounded to multiples of 8
Output: one PNG, input | condition map | generated."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the description's and epilog's lines as written."""


def parse_args(condition: str, description: str | None, argv: Sequence[str] | None = None, *,
               extra_flags: Callable[[argparse.ArgumentParser], Any] | None = None) -> argparse.Namespace:
    """The standard flags of examples/<condition>.py; `args.params` is the --set dict (JSON values, else text).
    `extra_flags(parser)` adds a script's own flags (e.g. inpaint's --mask) after the standard ones.

    Raises:
        ConfigError: --base without --controlnet (or the reverse), or a --set item that is not KEY=VALUE.
        OutputError: -o is not a .png path or cannot be written there.
    """
    from controlkit.demo.showcase import DEMO_GUIDANCE, DEMO_STEPS
    from controlkit.files import check_output_file

    parser = argparse.ArgumentParser(prog=f"examples/{condition}.py", description=description, epilog=EPILOG,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("image", nargs="?", help="your image; default: a toy render (demo) or a bundled photo")
    parser.add_argument("--base", help="a Stable Diffusion base (diffusers folder or single file)")
    article = "an" if condition[0] in "aeiou" else "a"
    parser.add_argument("--controlnet", help=f"{article} {condition} ControlNet for that base (folder or file)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="params",
                        help="preprocessor parameter (repeatable), e.g. --set low_threshold=50")
    parser.add_argument("--prompt", help="default: the toy render's caption; '' for your image with the demo "
                        "models; a generic photo prompt with your models")
    parser.add_argument("--seed", type=int, default=0, help="generation seed")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=DEMO_GUIDANCE, help="classifier-free guidance scale")
    parser.add_argument("--toy-seed", type=int, default=3, help="which held-out toy render is the default input")
    parser.add_argument("-o", "--output", default=f"out/examples/{condition}.png", help="output PNG")
    if extra_flags is not None:
        extra_flags(parser)
    args = parser.parse_args(argv)
    if (args.base is None) != (args.controlnet is None):
        raise ConfigError("--base and --controlnet go together (leave both out to use the demo models)")
    args.params = dict(_assignment(item) for item in args.params)
    check_output_file(args.output, "-o", suffix=".png")  # before the models load, not after the generation
    return args


def _assignment(item: str) -> tuple[str, Any]:
    """'low_threshold=50' -> ('low_threshold', 50): the value as `--set` reads it (`parse_param_value`)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    return key.strip(), parse_param_value(text)


def load_models(condition: str, args: argparse.Namespace) -> tuple[StableDiffusionPipeline, ControlNetModel, Any]:
    """(base, ControlNet, its condition metadata) in float32: the demo's for `condition`, or --base and
    --controlnet."""
    import torch

    from controlkit.checkpoint import load_controlnet
    from controlkit.demo.models import load_demo_base, load_demo_controlnet
    from controlkit.pipeline import load_base, quiet_loading

    quiet_loading()  # one output line per example, not a progress bar per component
    if args.base is None:
        base = load_demo_base()
        return (base, *load_demo_controlnet(condition, unet=base.unet))
    base = load_base(args.base, torch_dtype=torch.float32)
    return (base, *load_controlnet(args.controlnet, unet=base.unet, torch_dtype=torch.float32))


@dataclass
class ExampleInput:
    """The input of one example run.

    image: (H, W, 3) uint8 RGB at the size to generate at: 64 x 64 with the demo models (your image resized:
    the demo ControlNets were trained on maps of 64-pixel images), else your image with its sides rounded to
    multiples of 8. prompt: the text prompt. exact_map: the toy world's own (64, 64, 3) uint8 map for the
    default toy render of pose, depth or normal (without --set); None means "annotate `image` with the
    preprocessor". note: what the output line adds about the resizing ('' or ' (...)').
    """

    image: np.ndarray
    prompt: str
    exact_map: np.ndarray | None
    note: str


def load_input(condition: str, args: argparse.Namespace) -> ExampleInput:
    """Your image (args.image), else a held-out toy render (demo models) or a bundled photo (your models)."""
    from controlkit.demo.models import DEMO_SIZE
    from controlkit.demo.photos import sample_photo
    from controlkit.demo.showcase import exact_map, held_out_render
    from controlkit.image import load_image, resize_to

    demo = args.base is None
    if args.image is None and demo:
        render = held_out_render(condition, args.toy_seed)
        truth = None if args.params else exact_map(condition, render)  # --set asks for the preprocessor
        return ExampleInput(render.image, render.caption if args.prompt is None else args.prompt, truth, "")
    image = load_image(args.image) if args.image is not None else sample_photo("astronaut")
    prompt = args.prompt if args.prompt is not None else ("" if demo else PHOTO_PROMPT)
    height, width = image.shape[:2]
    size = (DEMO_SIZE, DEMO_SIZE) if demo else (_multiple_of_8(width), _multiple_of_8(height))
    if size == (width, height):
        return ExampleInput(image, prompt, None, "")
    why = "the demo models work at 64 px" if demo else "sides rounded to multiples of 8"
    note = f" (your {width}x{height} image resized to {size[0]}x{size[1]}: {why})"
    return ExampleInput(resize_to(image, size), prompt, None, note)


def _multiple_of_8(side: int) -> int:
    return max(8, round(side / 8) * 8)


def save_panels(images: Sequence[Any], path: str | Path) -> Path:
    """The images (anything `load_image` takes) side by side in one PNG, each resized to the first one's height,
    with a 4-pixel white gap between them; written whole or not at all.

    Raises:
        OutputError: `path` does not end in .png, or cannot be written (one line; nothing left under its name).
    """
    from PIL import Image

    from controlkit.files import atomic_path, check_output_file
    from controlkit.image import load_image, resize_to

    path = check_output_file(path, "-o", suffix=".png")
    arrays = [load_image(image) for image in images]
    height = arrays[0].shape[0]
    panels = []
    for array in arrays:
        width = max(1, round(array.shape[1] * height / array.shape[0]))
        panels += [resize_to(array, (width, height)), np.full((height, 4, 3), 255, np.uint8)]
    with atomic_path(path) as temporary:
        Image.fromarray(np.concatenate(panels[:-1], axis=1)).save(temporary, format="PNG")
    return path


def run(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """`main(argv)` (default: the command line's arguments); a user error (ControlkitError, or the registry's
    ValueError for an unknown --set parameter) prints one line on stderr and returns 1."""
    try:
        return main(list(sys.argv[1:] if argv is None else argv))
    except (ControlkitError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
