"""`controlkit upscale`: an image, a base and a tile ControlNet in, the image upscaled (whole or in tiles) out."""

from __future__ import annotations

import argparse
import time

from controlkit.cli.common import HelpFormatter, add_base_flags, add_device_flags
from controlkit.cli.generate import FLAGS
from controlkit.errors import ConfigError

EPILOG = """examples:
  controlkit upscale photo.png --base models/sd15 --controlnet models/cn-tile -o photo-2x.png
  controlkit upscale photo.png --base models/sd15 --controlnet models/cn-tile --prompt "a detailed photo" \\
      --scale 4 --tile 512 --overlap 64 --strength 0.4 --seed 1 -o photo-4x.png      # in tiles
"""

#: How upscale's own options are called in messages: by their flags (generate's flags for the rest).
UPSCALE_FLAGS = {**FLAGS, "scale": "--scale", "tile_size": "--tile", "overlap": "--overlap"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from controlkit.sampling import DEFAULT_SCHEDULER, SCHEDULERS
    from controlkit.upscale import DEFAULT_STRENGTH, MAX_SCALE, MAX_TILE, MAX_TILES, MIN_TILE

    parser = subparsers.add_parser(
        "upscale",
        help="upscale an image with a tile ControlNet (whole or in tiles)",
        description="Resize the image up by --scale, then run img2img with the tile ControlNet conditioned on the "
        "resized image itself (ControlNet 1.1 tile), in one generation or, with --tile, in overlapping tiles "
        "blended across their overlaps. With --preprocess the condition is made by the preprocessor the "
        "checkpoint names (else the tile preprocessor).",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("image", help="the image to upscale")
    add_base_flags(parser)
    parser.add_argument("--controlnet", required=True, metavar="PATH",
                        help="the tile ControlNet: a folder or file, or demo:CONDITION")
    parser.add_argument("--prompt", default="", help="the text prompt")
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from")
    parser.add_argument("--scale", type=float, default=2.0, help=f"output side over input side, in (1, {MAX_SCALE:g}]")
    parser.add_argument("--tile", type=int, default=None, metavar="PIXELS",
                        help=f"tile side, a multiple of 8 in {MIN_TILE}..{MAX_TILE} (at most {MAX_TILES} tiles); "
                        "leave it out for the whole image in one generation")
    parser.add_argument("--overlap", type=int, default=64, metavar="PIXELS",
                        help="pixels neighbouring tiles share, a multiple of 8 under half the tile")
    parser.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, help="img2img noise strength in (0, 1]")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: what the base records)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale, >= 0 (1 or less: off; default: the base's)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of every tile (CPU generator); random if not given")
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=sorted(SCHEDULERS), help="sampler")
    parser.add_argument("--control-scale", type=float, default=1.0, help="the ControlNet's strength")
    parser.add_argument("--preprocess", action="store_true",
                        help="make the condition with the preprocessor the checkpoint names (else tile)")
    add_device_flags(parser)
    parser.add_argument("-o", "--output", default="upscaled.png", help="output PNG")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from controlkit.checkpoint import load_controlnet
    from controlkit.control import MAX_SCALE, check_number
    from controlkit.devices import device_and_dtype, usable_device
    from controlkit.generation_options import check_generation_options
    from controlkit.image import load_image
    from controlkit.pipeline import load_base, output_paths, quiet_loading, save_images
    from controlkit.upscale import plan_upscale, upscale
    from controlkit.weights import resolve_model_name

    # everything that can be checked is checked before a model loads: options, device, output path, image, size
    check_generation_options(steps=args.steps, guidance_scale=args.guidance, seed=args.seed, strength=args.strength,
                             names=FLAGS)
    check_number(args.control_scale, "--control-scale", 0.0, MAX_SCALE)
    if args.device is not None:
        usable_device(args.device, "--device")
    paths = output_paths(args.output, 1, "-o")
    image = load_image(args.image)
    plan = plan_upscale((image.shape[1], image.shape[0]), args.scale, args.tile, args.overlap, name=args.image,
                        names=UPSCALE_FLAGS)
    device, dtype = device_and_dtype(args.device, args.dtype)
    quiet_loading()
    started = time.perf_counter()
    base = load_base(args.base, torch_dtype=dtype, device=device, config=args.base_config)
    controlnet, metadata = load_controlnet(resolve_model_name(args.controlnet, "controlnet"), unet=base.unet,
                                           torch_dtype=base.unet.dtype)
    preprocessor = _preprocessor(metadata) if args.preprocess else None
    loaded = time.perf_counter()
    result = upscale(
        base, image, args.prompt, controlnet, scale=args.scale, tile_size=args.tile, overlap=args.overlap,
        strength=args.strength, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
        negative_prompt=args.negative_prompt, scheduler=args.scheduler, control_scale=args.control_scale,
        preprocessor=preprocessor,
    )
    record = {**result.settings, "base": str(args.base), "controlnet": str(args.controlnet), "image": args.image}
    written = save_images([result.image], paths, record)
    settings = result.settings
    print(
        f"{settings['width']}x{settings['height']} from {image.shape[1]}x{image.shape[0]} (x{args.scale:g}) in "
        f"{result.tiles} tile(s) of {plan.tile[0]}x{plan.tile[1]}, seed {result.seed}, {settings['steps']} steps "
        f"{args.scheduler}, strength {args.strength:g}, {settings['device']} {settings['dtype']}; "
        f"load {loaded - started:.1f} s, upscale {time.perf_counter() - loaded:.1f} s"
    )
    for path in written:
        print(f"  -> {path}")
    return 0


def _preprocessor(metadata: object) -> object:
    """The preprocessor the checkpoint's metadata names (with its parameters), else the tile preprocessor."""
    from preprocessors.registry import checkpoint_preprocessor

    try:
        return checkpoint_preprocessor("tile", metadata)
    except ValueError as error:
        raise ConfigError(
            f"--preprocess: {error} Use a ControlNet whose metadata names a known preprocessor"
        ) from None
