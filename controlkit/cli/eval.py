"""`controlkit eval`: the controllability of a ControlNet on a paired dataset (ControlNet++'s protocol)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from controlkit.cli.common import HelpFormatter, parse_assignments, parse_named

EPILOG = """examples:
  controlkit eval --base models/sd15 --controlnet canny=runs/canny/final --data val/manifest.jsonl --limit 100
  controlkit eval --base models/sd15 --controlnet depth=cn-depth/ --data val/ --set model=models/dpt --json
  controlkit eval --base demo/ --controlnet pose=runs/pose --data poses/ --steps 20 --output grids/

For each pair, the condition map (given, or computed from the image with NAME's preprocessor) is brought to
--resolution as in training (short side resized, centre crop), an image is generated from it and the caption,
the image is re-annotated with NAME's preprocessor, and the result is compared with the map: edge F1 (canny),
SSIM (softedge, lineart), RMSE (depth), angular error (normal), keypoint distance (pose).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="measure how well a ControlNet follows its conditions on a paired dataset",
        description="Generate one image per pair and report the controllability metric of the condition "
        "(re-annotate the generated image, compare with the input condition). Bad pairs are skipped and "
        "listed. Exit status 1 if no pair could be evaluated.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--base", required=True, help="Stable Diffusion base: diffusers folder or single file")
    parser.add_argument(
        "--controlnet", required=True, metavar="NAME=PATH",
        help="the condition name (canny, softedge, lineart, depth, normal, pose) and the ControlNet to evaluate",
    )
    parser.add_argument("--data", required=True, metavar="SOURCE", help="paired dataset (see `controlkit dataset`)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (ControlNet++: UniPC, 20)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--scale", type=float, default=1.0, help="control strength")
    parser.add_argument("--resolution", type=int, default=512, help="side of the square condition and image")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N pairs only")
    parser.add_argument("--seed", type=int, default=42, help="generation seed, the same for every pair")
    parser.add_argument("--negative-prompt", default="worst quality, low quality", help="negative prompt")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", dest="params",
        help="parameter of NAME's preprocessor, for computing missing maps and re-annotating (repeatable; "
        "default: the parameters stored with the ControlNet)",
    )
    parser.add_argument("--output", metavar="DIR", help="also save condition | generated grids here")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from controlkit.control import Control
    from controlkit.pipeline import generate, load_base
    from training.data.dataset import PairedDataset, load_pairs, make_condition_fn
    from training.metrics import controllability, metric_spec

    name, path = _one_controlnet(args.controlnet)
    metric_spec(name)  # an unknown condition fails before any model is loaded
    _check_numbers(args)
    pairs = load_pairs(args.data)[: args.limit]
    base = load_base(args.base, device=args.device)
    control = Control.from_pretrained(path, None, unet=base.unet, scale=args.scale)
    params = _preprocessor_params(control, name, parse_assignments(args.params, "--set"))
    missing_maps = any(pair.condition is None for pair in pairs)
    condition_fn = make_condition_fn(name, params) if missing_maps else None
    dataset = PairedDataset(pairs, resolution=args.resolution, condition_fn=condition_fn, seed=args.seed)
    annotator = _annotator(name, params)
    generated, conditions, keys = [], [], []
    for index in _progress(range(len(dataset)), quiet=args.json):
        item = dataset[index]
        if item is None:
            continue
        condition = (item["conditioning_pixel_values"].permute(1, 2, 0) * 255).round().byte().numpy()
        result = generate(
            base, item["prompt"], [replace(control, image=condition)], negative_prompt=args.negative_prompt,
            steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
        )
        generated.append(result.images[0])
        conditions.append(condition)
        keys.append(pairs[index].key)
        if args.output:
            _save_grid(Path(args.output), len(keys) - 1, condition, result.images[0])
    for key, reason in dataset.bad_pairs:
        print(f"skipped {key}: {reason}", file=sys.stderr)
    if not generated:
        print(f"error: no pair of {args.data} could be evaluated ({len(dataset.bad_pairs)} bad)", file=sys.stderr)
        return 1
    metric = controllability(name, generated, conditions, preprocessor=annotator)
    _report(args, name, metric, keys, len(dataset.bad_pairs))
    return 0


def _one_controlnet(text: str) -> tuple[str, str]:
    named = parse_named([text], "--controlnet")
    ((name, path),) = named.items()
    return name, path


def _check_numbers(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise argparse.ArgumentTypeError(f"--steps must be at least 1, got {args.steps}")
    if args.limit is not None and args.limit < 1:
        raise argparse.ArgumentTypeError(f"--limit must be at least 1, got {args.limit}")
    if args.resolution < 8 or args.resolution % 8:
        raise argparse.ArgumentTypeError(f"--resolution must be a positive multiple of 8, got {args.resolution}")


def _preprocessor_params(control: Any, name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The ControlNet's stored preprocessor parameters (when it was trained on NAME's maps), then --set."""
    metadata = control.metadata
    stored = {}
    if metadata is not None and metadata.preprocessor == name:
        stored = dict(metadata.preprocessor_params)
    return {**stored, **given}


def _annotator(name: str, params: dict[str, Any]) -> Any:
    from controlkit.errors import ConfigError
    from preprocessors.registry import get_preprocessor

    try:
        return get_preprocessor(name, **params)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"preprocessor '{name}': {error}") from None


def _progress(indices: range, *, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(indices, unit="pair", file=sys.stderr, disable=quiet or len(indices) < 2)


def _save_grid(folder: Path, index: int, condition: Any, image: Any) -> None:
    import numpy as np

    from controlkit.image import load_image, resize_to, to_pil

    picture = load_image(image)
    grid = np.concatenate([resize_to(condition, (picture.shape[1], picture.shape[0])), picture], axis=1)
    folder.mkdir(parents=True, exist_ok=True)
    to_pil(grid).save(folder / f"{index:05d}.png")


def _report(args: argparse.Namespace, name: str, metric: Any, keys: list[str], skipped: int) -> None:
    direction = "higher is better" if metric.higher_is_better else "lower is better"
    if args.json:
        print(json.dumps({
            "condition": name, "metric": metric.name, "value": _finite(metric.value),
            "higher_is_better": metric.higher_is_better, "pairs": len(keys), "skipped": skipped,
            "extra": {key: _finite(value) for key, value in metric.extra.items()},
            "per_image": [{"key": key, "value": _finite(value)} for key, value in zip(keys, metric.per_image)],
            "settings": {"steps": args.steps, "guidance": args.guidance, "scale": args.scale, "seed": args.seed,
                         "resolution": args.resolution},
        }, indent=2))
        return
    extra = "".join(f", {key} {value:.4f}" for key, value in metric.extra.items())
    print(f"{name}: {metric.name} {metric.value:.4f} ({direction}){extra} over {len(keys)} pairs"
          + (f", {skipped} skipped" if skipped else ""))


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined score is null."""
    return None if math.isnan(value) else value
