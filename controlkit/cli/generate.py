"""`controlkit generate`: a prompt, a base model and named controls in, PNG images out."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from controlkit.cli.common import HelpFormatter, parse_named
from controlkit.devices import AUTO, DTYPE_NAMES
from controlkit.errors import ConfigError

EPILOG = """examples:
  controlkit generate "a red house" --base models/sd15 --controlnet canny=models/cn-canny --control canny=edges.png
  controlkit generate "a dancer" --base sd15.safetensors --base-config models/sd15 --controlnet pose=cn-pose \\
      --control pose=photo.jpg --preprocess --mode pose=control --steps 30 --seed 1 -o dancer.png
  controlkit generate "a room" --base models/sd15 --controlnet depth=cn-depth --control depth=depth.png \\
      --controlnet edges=cn-canny --control edges=edges.png --scale edges=0.6 --end edges=0.5 --num-images 4
"""

DTYPES = (AUTO, *DTYPE_NAMES)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from controlkit.control import MODES, RESIZE_MODES
    from controlkit.sampling import DEFAULT_SCHEDULER, SCHEDULERS

    parser = subparsers.add_parser(
        "generate",
        help="generate images with Stable Diffusion and one or more ControlNets",
        description="Generate images from a prompt with a Stable Diffusion base and named controls. NAME ties a "
        "--control image to its --controlnet and to its per-control options; with --preprocess the image is a "
        "photo and is first turned into a condition map by the preprocessor the checkpoint names (else the "
        "preprocessor called NAME). Several images are written as OUT-0.png, OUT-1.png, ...",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("prompt", help="the text prompt")
    parser.add_argument("--base", required=True, help="diffusers folder or single-file checkpoint of the base")
    parser.add_argument("--base-config", help="for a single-file base: a diffusers folder with its config files")
    parser.add_argument("--controlnet", action="append", metavar="NAME=PATH", help="a ControlNet (repeatable)")
    parser.add_argument("--control", action="append", metavar="NAME=IMAGE", help="its condition image (repeatable)")
    parser.add_argument("--preprocess", action="store_true", help="control images are photos: annotate them first")
    parser.add_argument("--scale", action="append", metavar="NAME=S", help="control strength; 1.0 when not given")
    parser.add_argument("--mode", action="append", metavar="NAME=MODE", help=f"one of {', '.join(MODES)}")
    parser.add_argument("--start", action="append", metavar="NAME=F", help="fraction of the steps where it starts (0)")
    parser.add_argument("--end", action="append", metavar="NAME=F", help="fraction of the steps where it ends (1)")
    parser.add_argument(
        "--layer-weights", action="append", metavar="NAME=W1,W2,...", help="one weight per ControlNet output (13)"
    )
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=None, help="seed (CPU generator); random if not given")
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=sorted(SCHEDULERS), help="sampler")
    parser.add_argument("--width", type=int, help="output width, a multiple of 8; default: the control image's")
    parser.add_argument("--height", type=int, help="output height, a multiple of 8; default: the control image's")
    parser.add_argument("--resize-mode", default="resize", choices=RESIZE_MODES, help="fitting other-size images")
    parser.add_argument("--num-images", type=int, default=1, help="images in one batch")
    parser.add_argument("--init-image", help="start from this image (img2img)")
    parser.add_argument("--strength", type=float, default=0.75, help="img2img noise strength in (0, 1]")
    parser.add_argument("--device", default=None, help="torch device; cuda if available, else cpu")
    parser.add_argument("--dtype", default=AUTO, choices=DTYPES, help="auto: float16 on GPU, float32 on CPU")
    parser.add_argument("-o", "--output", default="generated.png", help="output PNG")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from controlkit.devices import device_and_dtype
    from controlkit.image import load_image
    from controlkit.pipeline import generate, load_base, quiet_loading

    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise ConfigError(f"-o {args.output}: the output must be a .png path")
    images, controlnets, options = _named_options(args)
    photos = {name: load_image(path) for name, path in images.items()}  # bad images fail before models load
    if args.init_image is not None:
        load_image(args.init_image)
    device, dtype = device_and_dtype(args.device, args.dtype)
    quiet_loading()
    started = time.perf_counter()
    base = load_base(args.base, torch_dtype=dtype, device=device, config=args.base_config)
    controls = [
        _load_control(name, controlnets[name], photos[name], options.get(name, {}), base.unet, args.preprocess)
        for name in images
    ]
    loaded = time.perf_counter()
    result = generate(
        base, args.prompt, controls, negative_prompt=args.negative_prompt, steps=args.steps,
        guidance_scale=args.guidance, seed=args.seed, scheduler=args.scheduler, num_images=args.num_images,
        width=args.width, height=args.height, resize_mode=args.resize_mode, init_image=args.init_image,
        strength=args.strength,
    )
    record = {**result.settings, "base": str(args.base), "controls": _describe(images, controlnets, controls)}
    paths = _write_images(result.images, output, record)
    settings = result.settings
    print(
        f"{len(paths)} image(s) {settings['width']}x{settings['height']}, seed {result.seed}, {args.steps} steps "
        f"{args.scheduler}, {settings['device']} {settings['dtype']}; load {loaded - started:.1f} s, "
        f"generate {time.perf_counter() - loaded:.1f} s"
    )
    for path in paths:
        print(f"  -> {path}")
    return 0


def _named_options(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, Any]]]:
    """Control images, ControlNet paths and per-name options, with every NAME checked against the others."""
    images = parse_named(args.control, "--control")
    controlnets = parse_named(args.controlnet, "--controlnet")
    for name in images:
        if name not in controlnets:
            raise ConfigError(f"--control {name} has no ControlNet; add --controlnet {name}=PATH")
    for name in controlnets:
        if name not in images:
            raise ConfigError(f"--controlnet {name} has no condition image; add --control {name}=IMAGE")
    options: dict[str, dict[str, Any]] = {}
    for flag, key, convert in (
        ("--scale", "scale", float), ("--mode", "mode", str), ("--start", "start", float), ("--end", "end", float),
        ("--layer-weights", "layer_weights", _weights),
    ):
        for name, text in parse_named(getattr(args, key), flag).items():
            if name not in images:
                known = ", ".join(images) or "none"
                raise ConfigError(f"{flag} {name}: no control named {name!r} (controls: {known})")
            try:
                options.setdefault(name, {})[key] = convert(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag} {name}={text}: not a valid value") from None
    return images, controlnets, options


def _weights(text: str) -> list[float]:
    return [float(item) for item in text.split(",")]


def _load_control(name: str, source: str, photo: Any, options: dict[str, Any], unet: Any, preprocess: bool) -> Any:
    from controlkit.control import Control

    control = Control.from_pretrained(source, photo, unet=unet, torch_dtype=unet.dtype, **options)
    if preprocess:
        control.preprocessor = _preprocessor(name, control.metadata)
    return control


def _preprocessor(name: str, metadata: Any) -> Any:
    """The preprocessor the checkpoint's metadata names (with its parameters), else the one called `name`."""
    from preprocessors.registry import checkpoint_preprocessor

    try:
        return checkpoint_preprocessor(name, metadata)
    except ValueError as error:
        raise ConfigError(
            f"--preprocess {name}: {error} Name the control after its preprocessor, or use a ControlNet whose "
            "metadata names one"
        ) from None


def _describe(images: dict[str, str], controlnets: dict[str, str], controls: list[Any]) -> list[dict[str, Any]]:
    return [
        {"name": name, "image": images[name], "controlnet": controlnets[name], "scale": control.scale,
         "mode": control.mode, "start": control.start, "end": control.end}
        for name, control in zip(images, controls)
    ]


def _write_images(images: list[Any], output: Path, record: dict[str, Any]) -> list[Path]:
    """OUT.png for one image, OUT-0.png, OUT-1.png, ... for several; the settings go into a PNG text chunk."""
    from PIL.PngImagePlugin import PngInfo

    output.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("controlkit", json.dumps(record, sort_keys=True))
    paths = [output] if len(images) == 1 else [output.with_name(f"{output.stem}-{i}.png") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path, pnginfo=info)
    return paths
