"""`controlkit generate`: a prompt, a base model and named controls in, PNG images out."""

from __future__ import annotations

import argparse
import time
from typing import Any

from controlkit.cli.common import HelpFormatter, add_base_flags, add_device_flags, parse_named
from controlkit.errors import ConfigError

EPILOG = """examples:
  controlkit generate "a red sphere on a grey floor" --base demo --controlnet canny=demo:canny \\
      --control canny=photo.jpg --preprocess --width 64 --height 64 -o sphere.png     # the shipped demo models
  controlkit generate "a red house" --base models/sd15 --controlnet canny=models/cn-canny --control canny=edges.png
  controlkit generate "a dancer" --base sd15.safetensors --base-config models/sd15 --controlnet pose=cn-pose \\
      --control pose=photo.jpg --preprocess --mode pose=control --steps 30 --seed 1 -o dancer.png
  controlkit generate "a room" --base models/sd15 --controlnet depth=cn-depth --control depth=depth.png \\
      --controlnet edges=cn-canny --control edges=edges.png --scale edges=0.6 --end edges=0.5 --num-images 4
  controlkit generate "a loft" --base models/sdxl --controlnet canny=models/cn-canny-sdxl --control canny=edges.png
  controlkit generate "a loft" --base models/sdxl --controlnet depth=models/union-promax --control depth=depth.png \\
      --controlnet edges=models/union-promax --control edges=edges.png --control-type depth=depth \\
      --control-type edges=canny                               # one ControlNet-Union model, two control types
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from controlkit.control import MODES, RESIZE_MODES
    from controlkit.generation_options import MAX_BATCH_PIXELS, MAX_IMAGE_PIXELS
    from controlkit.sampling import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, MAX_STEPS, SCHEDULERS

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
    add_base_flags(parser)
    parser.add_argument("--controlnet", action="append", metavar="NAME=PATH",
                        help="a ControlNet (repeatable): a folder or file, or demo:CONDITION (e.g. demo:canny)")
    parser.add_argument("--control", action="append", metavar="NAME=IMAGE", help="its condition image (repeatable)")
    parser.add_argument("--preprocess", action="store_true", help="control images are photos: annotate them first")
    parser.add_argument("--scale", action="append", metavar="NAME=S", help="control strength; 1.0 when not given")
    parser.add_argument("--mode", action="append", metavar="NAME=MODE", help=f"one of {', '.join(MODES)}")
    parser.add_argument("--start", action="append", metavar="NAME=F", help="fraction of the steps where it starts (0)")
    parser.add_argument("--end", action="append", metavar="NAME=F", help="fraction of the steps where it ends (1)")
    parser.add_argument(
        "--layer-weights", action="append", metavar="NAME=W1,W2,...",
        help="one weight per ControlNet output (13 for SD1.x/SD2.x, 10 for SDXL)"
    )
    parser.add_argument("--every", action="append", metavar="NAME=K|S1,S2,...",
                        help="step reuse: run the ControlNet every K-th step of its window (or at these 0-based "
                        "steps) and reuse its last residuals in between; 1 (every step) when not given")
    parser.add_argument("--control-type", action="append", metavar="NAME=TYPE",
                        help="for a ControlNet-Union: the control's type (openpose, depth, softedge, canny, lineart, "
                        "normal, segment, tile, ...)")
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"denoising steps, 1..{MAX_STEPS}; default: what the base records (demo: 20), else 20")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale, >= 0 (1 or less: off); default: what the base "
                        f"records (demo: 2), else {DEFAULT_GUIDANCE} (SDXL: 5)")
    parser.add_argument("--seed", type=int, default=None, help="seed (CPU generator), 0..2**64-1; random if not given")
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=sorted(SCHEDULERS), help="sampler")
    parser.add_argument("--width", type=int, help="output width, a multiple of 8; default: the control image's")
    parser.add_argument("--height", type=int, help="output height, a multiple of 8; default: the control image's "
                        f"(width x height at most {MAX_IMAGE_PIXELS / 1e6:.1f} MP, x --num-images at most "
                        f"{MAX_BATCH_PIXELS / 1e6:.1f} MP)")
    parser.add_argument("--resize-mode", default="resize", choices=RESIZE_MODES, help="fitting other-size images")
    parser.add_argument("--num-images", type=int, default=1, help="images in one batch")
    parser.add_argument("--init-image", help="start from this image (img2img)")
    parser.add_argument("--strength", type=float, default=0.75, help="img2img noise strength in (0, 1]")
    parser.add_argument("--mask", help="inpaint: white where --init-image is repainted, black where it is kept "
                        "(the inpaint preprocessor's controls get it too; --strength 1 starts the region from noise)")
    parser.add_argument("--keep-unmasked", action=argparse.BooleanOptionalAction, default=True,
                        help="with --mask, put the init image's own pixels back outside it (default: yes)")
    add_device_flags(parser)
    parser.add_argument("--compile", action="store_true",
                        help="compile the U-Net and ControlNets (torch.compile; the first run pays the compilation)")
    sdxl = parser.add_argument_group("SDXL micro-conditioning (diffusers' (height, width) and (top, left) order)")
    for flag, what in MICRO_FLAGS.items():
        sdxl.add_argument(flag, type=int, nargs=2, metavar=("TOP", "LEFT") if "crop" in flag else ("H", "W"),
                          help=what)
    parser.add_argument("-o", "--output", default="generated.png", help="output PNG")
    parser.set_defaults(run=run)


#: The SDXL micro-conditioning flags -> their help (the option of `generate` is the flag's name, as in diffusers).
MICRO_FLAGS = {
    "--original-size": "the size the image is said to have had (default: the output size)",
    "--crops-coords-top-left": "the crop it is said to be (default: 0 0)",
    "--target-size": "the size it is said to be made at (default: the output size)",
    "--negative-original-size": "the same for the unconditional side (default: the positive value)",
    "--negative-crops-coords-top-left": "the same for the unconditional side (default: the positive value)",
    "--negative-target-size": "the same for the unconditional side (default: the positive value)",
}


#: How generate's options are called in messages: by their flags.
FLAGS = {"steps": "--steps", "guidance_scale": "--guidance", "seed": "--seed", "num_images": "--num-images",
         "width": "--width", "height": "--height", "strength": "--strength", "resize_mode": "--resize-mode"}


def run(args: argparse.Namespace) -> int:
    from controlkit.devices import device_and_dtype, usable_device
    from controlkit.generation_options import check_generation_options
    from controlkit.pipeline import generate, load_base, output_paths, quiet_loading, save_images

    # everything that can be checked is checked before a model loads: options, device, output paths, images
    check_generation_options(steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                             num_images=args.num_images, width=args.width, height=args.height,
                             strength=args.strength, resize_mode=args.resize_mode, names=FLAGS)
    sizes = _size_conditioning(args)
    images, controlnets, options = _named_options(args)
    if args.device is not None:
        usable_device(args.device, "--device")
    paths = output_paths(args.output, args.num_images, "-o")
    photos, init = _read_images(images, args.init_image)
    mask = _read_mask(args)
    _check_size(args, photos, init)
    device, dtype = device_and_dtype(args.device, args.dtype)
    quiet_loading()
    started = time.perf_counter()
    base = load_base(args.base, torch_dtype=dtype, device=device, config=args.base_config)
    loaded_models: dict[str, Any] = {}  # one model per path: controls on one Union model then share a forward
    controls = [
        _load_control(name, controlnets[name], photos[name], options.get(name, {}), base.unet, args.preprocess,
                      loaded_models)
        for name in images
    ]
    loaded = time.perf_counter()
    result = generate(  # a size far from the base's is one `note:` line (controlkit.cli.common.notes)
        base, args.prompt, controls, negative_prompt=args.negative_prompt, steps=args.steps,
        guidance_scale=args.guidance, seed=args.seed, scheduler=args.scheduler, num_images=args.num_images,
        width=args.width, height=args.height, resize_mode=args.resize_mode, init_image=init, strength=args.strength,
        mask=mask, keep_unmasked=args.keep_unmasked, compile=args.compile, **sizes,
    )
    record = {**result.settings, "base": str(args.base), "controls": _describe(images, controlnets, controls)}
    written = save_images(result.images, paths, record)
    settings = result.settings
    print(
        f"{len(written)} image(s) {settings['width']}x{settings['height']}, seed {result.seed}, {settings['steps']} "
        f"steps {args.scheduler}, guidance {settings['guidance_scale']:g}, {settings['device']} {settings['dtype']}; "
        f"load {loaded - started:.1f} s, generate {time.perf_counter() - loaded:.1f} s"
    )
    for path in written:
        print(f"  -> {path}")
    return 0


def _size_conditioning(args: argparse.Namespace) -> dict[str, Any]:
    """The SDXL micro-conditioning options given, checked (a base of another family refuses them at generation)."""
    from controlkit.conditioning import SizeConditioning

    given = {flag[2:].replace("-", "_"): tuple(getattr(args, flag[2:].replace("-", "_")))
             for flag in MICRO_FLAGS if getattr(args, flag[2:].replace("-", "_")) is not None}
    SizeConditioning(**given)
    return given


def _read_images(images: dict[str, str], init_image: str | None) -> tuple[dict[str, Any], Any]:
    """Every control image and the init image, read (and refused one line each) before a model loads. Control
    images keep a masked region (an inpaint map, or a photo with the region to repaint erased)."""
    from controlkit.image import load_condition, load_image

    photos = {name: load_condition(path) for name, path in images.items()}
    return photos, None if init_image is None else load_image(init_image)


def _read_mask(args: argparse.Namespace) -> Any:
    """--mask read and checked with --init-image before a model loads (None without --mask)."""
    from controlkit.inpainting import check_masking
    from controlkit.masks import check_repaints, load_mask

    check_masking(args.mask, args.init_image, args.keep_unmasked)
    if args.mask is None:
        return None
    grey = load_mask(args.mask)
    check_repaints(grey, "--mask")
    return grey


def _check_size(args: argparse.Namespace, photos: dict[str, Any], init: Any) -> None:
    """The output size bound, checked now when the size is known without the base (given, or an image's)."""
    from controlkit.generation_options import check_working_size, output_size

    reference = next(iter(photos.values()), init)
    if reference is None and (args.width is None or args.height is None):
        return  # the base's native size: known once it is loaded, and checked then
    size = output_size(args.width, args.height, None if reference is None else reference.shape[:2], (0, 0))
    origin = "" if args.width and args.height else ("the control image's" if photos else "the init image's")
    check_working_size(size, args.num_images, origin=origin, names=FLAGS)


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
        ("--layer-weights", "layer_weights", _weights), ("--control-type", "control_type", str),
        ("--every", "every", _every),
    ):
        for name, text in parse_named(getattr(args, key), flag).items():
            if name not in images:
                known = ", ".join(images) or "none"
                raise ConfigError(f"{flag} {name}: no control named {name!r} (controls: {known})")
            try:
                options.setdefault(name, {})[key] = convert(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag} {name}={text}: not a valid value") from None
    from controlkit.control import OPTION_DEFAULTS, check_control_options, check_every

    for name in images:  # every control's options in range before any model loads
        given = {key: value for key, value in options.get(name, {}).items() if key in OPTION_DEFAULTS}
        check_control_options(**{**OPTION_DEFAULTS, **given}, prefix=f"control {name}: ")
        if "every" in options.get(name, {}):
            check_every(options[name]["every"], f"control {name}: --every")
    return images, controlnets, options


def _weights(text: str) -> list[float]:
    return [float(item) for item in text.split(",")]


def _every(text: str) -> int | list[int]:
    """"3" -> 3 (every third step); "0,4,8" -> [0, 4, 8] (those steps); checked with the other options."""
    return [int(item) for item in text.split(",")] if "," in text else int(text)


def _load_control(name: str, source: str, photo: Any, options: dict[str, Any], unet: Any, preprocess: bool,
                  loaded: dict[str, Any]) -> Any:
    from controlkit.control import Control

    if source in loaded:
        first = loaded[source]
        options = {"conditional_only": first.conditional_only, **options}
        control = Control(photo, first.controlnet, metadata=first.metadata, **options)
    else:
        control = Control.from_pretrained(source, photo, unet=unet, torch_dtype=unet.dtype, **options)
        loaded[source] = control
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
         "mode": control.mode, "start": control.start, "end": control.end,
         **({"control_type": control.control_type} if control.control_type else {}),
         **({"every": control.every if isinstance(control.every, int) else sorted(control.every)}
            if control.every != 1 else {})}
        for name, control in zip(images, controls)
    ]
