"""`controlkit eval`: the controllability of a ControlNet on a paired dataset (ControlNet++'s protocol)."""

from __future__ import annotations

import argparse
import json
import math
import sys
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
    from training.evaluation import DEFAULT_NEGATIVE_PROMPT

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
    parser.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT, help="negative prompt")
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
    from controlkit.files import check_output_folder
    from controlkit.pipeline import load_base
    from training.data.dataset import load_pairs
    from training.evaluation import evaluate_controlnet
    from training.metrics import metric_spec

    name, path = _one_controlnet(args.controlnet)
    metric_spec(name)  # an unknown condition fails before any model is loaded
    _check_numbers(args)
    params = parse_assignments(args.params, "--set")
    if args.output is not None:
        check_output_folder(args.output, "--output")  # before hours of generation, not after
    pairs = load_pairs(args.data)[: args.limit]
    base = load_base(args.base, device=args.device)
    control = Control.from_pretrained(path, None, unet=base.unet, scale=args.scale)
    result = evaluate_controlnet(
        base, control, name, pairs, resolution=args.resolution, preprocessor_params=params, steps=args.steps,
        guidance=args.guidance, seed=args.seed, negative_prompt=args.negative_prompt, grid_folder=args.output,
        progress=not args.json,
    )
    for key, reason in result.bad_pairs:
        print(f"skipped {key}: {reason}", file=sys.stderr)
    if result.metric is None:
        print(f"error: no pair of {args.data} could be evaluated ({len(result.bad_pairs)} bad)", file=sys.stderr)
        return 1
    _report(args, name, result.metric, result.keys, len(result.bad_pairs))
    return 0


def _one_controlnet(text: str) -> tuple[str, str]:
    named = parse_named([text], "--controlnet")
    ((name, path),) = named.items()
    return name, path


def _check_numbers(args: argparse.Namespace) -> None:
    """Every numeric option in its range, before anything is loaded (usage errors, exit status 2)."""
    from controlkit.control import MAX_SCALE
    from training.config_rules import MAX_INFERENCE_STEPS, MAX_RESOLUTION, SEED_LIMIT

    rules = (
        ("--steps", args.steps, 1 <= args.steps <= MAX_INFERENCE_STEPS, f"in [1, {MAX_INFERENCE_STEPS}]"),
        ("--limit", args.limit, args.limit is None or args.limit >= 1, "at least 1"),
        ("--resolution", args.resolution, args.resolution % 8 == 0 and 8 <= args.resolution <= MAX_RESOLUTION,
         f"a positive multiple of 8 up to {MAX_RESOLUTION}"),
        ("--seed", args.seed, 0 <= args.seed < SEED_LIMIT, "in [0, 2**63)"),
        ("--guidance", args.guidance, math.isfinite(args.guidance) and args.guidance >= 0, "a finite number >= 0"),
        ("--scale", args.scale, math.isfinite(args.scale) and 0 <= args.scale <= MAX_SCALE, f"in [0, {MAX_SCALE}]"),
    )
    for option, value, ok, rule in rules:
        if not ok:
            raise argparse.ArgumentTypeError(f"{option} must be {rule}, got {value}")


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
