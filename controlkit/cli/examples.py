"""What the per-condition example scripts (examples/<condition>.py) share: input -> preprocessor -> generation.

    python examples/canny.py                              # a toy scene, the demo base and demo canny ControlNet
    python examples/canny.py photo.jpg                    # your image (the demo models work at 64 x 64)
    python examples/depth.py room.jpg --base models/sd15 --controlnet models/cn-depth \\
        --set model=Intel/dpt-hybrid-midas --prompt "a cosy room"     # real checkpoints

With the demo models (the default) the input defaults to a held-out toy-world render (a figure placed anywhere in
the frame for pose) and is generated at 64 x 64; depth, normal and pose inputs are annotated by the demo's toy-world
estimator (trained on the renderer's ground truth), the others by the preprocessor the ControlNet's metadata names.
With `--base` and `--controlnet` the input defaults to a bundled photo, the preprocessor is the one the
checkpoint's metadata names (else the registry entry called like the condition) with `--set` parameters, and the
output has the input's size (sides rounded to multiples of 8).
Output: one PNG with three panels, input | condition map | generated.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from controlkit.cli.common import HelpFormatter, checkpoint_preprocessor, parse_assignments
from controlkit.errors import ConfigError, ControlkitError

#: Generic prompts for real checkpoints when no --prompt is given.
PHOTO_PROMPT = "a high quality, detailed photograph"


def example_parser(condition: str) -> argparse.ArgumentParser:
    from controlkit.cli.showcase import DEMO_GUIDANCE, DEMO_STEPS

    parser = argparse.ArgumentParser(
        prog=f"examples/{condition}.py",
        description=f"{condition}: input image -> {condition} map -> generation under the {condition} ControlNet "
        "(the embedded demo models unless --base and --controlnet are given).",
        epilog=__doc__.split("\n\n", 2)[1],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("image", nargs="?", help="input image; default: a toy scene (demo) or a bundled photo")
    parser.add_argument("--prompt", help="default: the toy scene's caption, or a generic photo prompt")
    parser.add_argument("--base", help="a Stable Diffusion base (diffusers folder or single file)")
    parser.add_argument("--controlnet", help=f"a {condition} ControlNet for that base (folder or file)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", dest="params",
                        help="preprocessor parameter (repeatable), e.g. --set low_threshold=50")
    parser.add_argument("--toy-seed", type=int, default=3, help="which held-out toy render is the default input")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=DEMO_GUIDANCE, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="generation seed")
    parser.add_argument("-o", "--output", default=f"out/examples/{condition}.png", help="output PNG")
    return parser


def run_example(condition: str, argv: Sequence[str] | None = None) -> int:
    """Run the example of `condition` with command-line arguments `argv`; returns the exit status."""
    import sys

    args = example_parser(condition).parse_args(argv)
    try:
        path, seconds = _run(condition, args)
    except ControlkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{condition}: input | condition | generated -> {path} ({seconds:.1f} s)")
    return 0


def _run(condition: str, args: argparse.Namespace) -> tuple[Path, float]:
    from controlkit.cli.generate import _quiet_loading
    from controlkit.control import Control
    from controlkit.pipeline import generate

    if (args.base is None) != (args.controlnet is None):
        raise ConfigError("--base and --controlnet go together (leave both out to use the demo models)")
    _quiet_loading()
    start = time.perf_counter()
    base, controlnet, metadata = _models(condition, args)
    image, prompt = _input(condition, args)
    annotate = _annotator(condition, metadata, parse_assignments(args.params, "--set"), demo=args.base is None)
    condition_map = np.asarray(annotate(image))
    height, width = (_multiple_of_8(side) for side in image.shape[:2])
    result = generate(base, prompt, [Control(condition_map, controlnet)], steps=args.steps,
                      guidance_scale=args.guidance, seed=args.seed, width=width, height=height, output_type="np")
    generated = (np.clip(result.images[0], 0.0, 1.0) * 255).round().astype(np.uint8)
    return _save_panels([image, condition_map, generated], Path(args.output)), time.perf_counter() - start


def _models(condition: str, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(base, ControlNet, its condition metadata): the demo's, or the given checkpoints."""
    import torch

    from controlkit.checkpoint import load_controlnet
    from controlkit.demo_models import load_demo_base, load_demo_controlnet
    from controlkit.pipeline import load_base

    if args.base is None:
        base = load_demo_base()
        controlnet, metadata = load_demo_controlnet(condition, unet=base.unet)
        return base, controlnet, metadata
    base = load_base(args.base, torch_dtype=torch.float32)
    controlnet, metadata = load_controlnet(args.controlnet, unet=base.unet, torch_dtype=torch.float32)
    return base, controlnet, metadata


def _input(condition: str, args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """The input image (RGB uint8) and the prompt."""
    from controlkit.image import load_image, resize_to
    from controlkit.samples import sample_photo

    demo = args.base is None
    if args.image is not None:
        image = load_image(args.image)
        if demo:
            image = resize_to(image, (64, 64))
        return image, args.prompt or ("" if demo else PHOTO_PROMPT)
    if not demo:
        return sample_photo("astronaut"), args.prompt or PHOTO_PROMPT
    from controlkit.cli.showcase import DEMO_SEED
    from training.toyworld import render_figure, render_scene

    sample = (render_figure((DEMO_SEED, args.toy_seed), anywhere=True) if condition == "pose"
              else render_scene((DEMO_SEED, args.toy_seed)))
    return sample.image, args.prompt or sample.caption


def _annotator(condition: str, metadata: Any, params: dict[str, Any], *, demo: bool) -> Any:
    """The demo's annotator of the condition, or the checkpoint's preprocessor with `params` over its own."""
    from controlkit.cli.showcase import condition_annotator

    if demo and not params:
        return condition_annotator(condition, metadata)
    try:
        return checkpoint_preprocessor(condition, metadata, params)
    except ValueError as error:
        raise ConfigError(f"--set: {error}") from None


def _multiple_of_8(side: int) -> int:
    return max(8, int(round(side / 8)) * 8)


def _save_panels(images: list[np.ndarray], path: Path) -> Path:
    """The images side by side (each resized to the first one's height), with a 4-pixel white gap."""
    from PIL import Image

    from controlkit.image import resize_to

    height = images[0].shape[0]
    panels = []
    for image in images:
        width = max(1, round(image.shape[1] * height / image.shape[0]))
        panels += [resize_to(image, (width, height)), np.full((height, 4, 3), 255, np.uint8)]
    if path.suffix.lower() != ".png":
        raise ConfigError(f"-o {path}: the output must be a .png path")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(panels[:-1], axis=1)).save(path)
    return path
