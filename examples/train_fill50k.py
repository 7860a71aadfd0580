"""Train a ControlNet the way the ControlNet tutorial does (fill50k: circle outline -> filled circle), on the CPU, on
top of the embedded demo base model; then the same on a folder of your own.

    python examples/train_fill50k.py                               # render 2000 circles, train, measure
    python examples/train_fill50k.py --folder my_pairs             # ROOT/images, ROOT/conditions, captions
    python examples/train_fill50k.py --folder photos --preprocessor canny      # maps computed from the images
    python examples/train_fill50k.py --base models/sd15 --resolution 512 --guidance 7.5   # a real base (use a GPU)

The folder layouts are those of `controlkit train` (docs/training.md): images/<stem>.png with conditions/<stem>.png
and a caption per image (images/<stem>.txt or captions.jsonl), or a manifest.jsonl.

After training, the new ControlNet is measured on held-out pairs (circles rendered from another seed; with
--folder, the last --held-out pairs, left out of training): the controllability metric of its generations
against control off (the base alone, same prompts and seeds), printed as one line, and OUTPUT/check.png, one row
per pair: condition | with control | control off | target. The metric is the --preprocessor's own
(training/metrics.py) when it has one, else edge F1 of a canny re-annotation, which fits outline maps: a filled
circle's edges are its outline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

#: Render seed of the held-out circles (the training circles use seed 0).
HELD_OUT_SEED = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", help="your paired data; default: fill50k-style circles rendered here")
    parser.add_argument("--preprocessor", help="compute condition maps with this registry preprocessor")
    parser.add_argument("--circles", type=int, default=2000, help="circles to render (without --folder)")
    parser.add_argument("--base", help="base model folder; default: the embedded demo base")
    parser.add_argument("--resolution", type=int, default=64, help="training side in pixels")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--held-out", type=int, default=8, help="pairs to measure on, never trained on")
    parser.add_argument("--guidance", type=float, default=2.0, help="guidance of the check (the demo base's)")
    parser.add_argument("-o", "--output", default="runs/examples/fill50k", help="training output folder")
    args = parser.parse_args(argv)
    if args.held_out < 1:
        parser.error(f"--held-out must be at least 1, got {args.held_out}")

    from controlkit.demo.models import base_path
    from controlkit.demo.toyworld.dataset import write_dataset
    from controlkit.errors import ConfigError, ControlkitError
    from training.config import load_config
    from training.data.dataset import load_pairs
    from training.engine.trainer import train

    output = Path(args.output)
    try:
        if args.folder:  # your pairs: the last --held-out ones are kept out of training
            data, pairs = Path(args.folder), load_pairs(args.folder)
            if len(pairs) <= args.held_out:
                raise ConfigError(f"--folder {data}: {len(pairs)} pairs, need more than --held-out {args.held_out}")
            train_count, held_out = len(pairs) - args.held_out, pairs[-args.held_out:]
        else:
            data = write_dataset(output.parent / "fill50k_data", args.circles, kind="circles", condition="outline")
            held_out = load_pairs(write_dataset(output.parent / "fill50k_held_out", args.held_out, kind="circles",
                                                condition="outline", seed=HELD_OUT_SEED))
            train_count = 0  # all
        overrides = [
            f"model.base={args.base or base_path()}", f"model.condition={args.preprocessor or 'outline'}",
            f"data.source={data}", f"data.max_samples={train_count}", f"data.resolution={args.resolution}",
            f"train.output_dir={output}", f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}",
            f"optim.learning_rate={args.learning_rate}", "data.proportion_empty_prompts=0.5",
            "checkpoint.every_steps=0", "checkpoint.resume=latest", "logging.report_to=none",
        ]
        if args.preprocessor:
            overrides.append(f"data.preprocessor={args.preprocessor}")
        start = time.perf_counter()
        result = train(load_config(None, overrides))
        print(f"trained {result.step} steps in {time.perf_counter() - start:.0f} s -> {result.output}")
        if result.output is not None:
            check(result.output, held_out, args)
    except ControlkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def check(controlnet_path: Path, pairs: list, args: argparse.Namespace) -> None:
    """Generate each held-out pair with the new ControlNet and with control off (same prompt and seed), print the
    controllability of both and save the grid OUTPUT/check.png (rows of four R x R cells)."""
    import numpy as np
    import torch
    from PIL import Image

    from controlkit.checkpoint import load_controlnet
    from controlkit.control import Control
    from controlkit.demo.models import base_path
    from controlkit.pipeline import generate, load_base, quiet_loading
    from training.data.dataset import PairedDataset, make_condition_fn
    from training.metrics import METRICS, controllability

    quiet_loading()
    base = load_base(args.base or base_path(), torch_dtype=torch.float32)
    controlnet, _ = load_controlnet(controlnet_path, unet=base.unet, torch_dtype=base.unet.dtype)
    condition_fn = make_condition_fn(args.preprocessor) if args.preprocessor else None
    dataset = PairedDataset(pairs, resolution=args.resolution, condition_fn=condition_fn)
    conditions, on, off, rows = [], [], [], []
    for index, item in enumerate(dataset[i] for i in range(len(dataset))):
        if item is None:  # an unreadable pair, skipped as in training
            continue
        condition = (item["conditioning_pixel_values"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        target = ((item["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        for controls, images in (([Control(condition, controlnet)], on), ([], off)):  # with control, control off
            result = generate(base, item["prompt"], controls, steps=20, guidance_scale=args.guidance, seed=index,
                              width=args.resolution, height=args.resolution)
            images.append(np.asarray(result.images[0]))
        conditions.append(condition)
        rows.append(np.concatenate([condition, on[-1], off[-1], target], axis=1))
    metric = args.preprocessor if args.preprocessor in METRICS else "canny"  # outlines: edges of the filled circle
    with_control, control_off = controllability(metric, on, conditions), controllability(metric, off, conditions)
    better = "higher" if with_control.higher_is_better else "lower"
    print(f"held-out controllability, {with_control.name} ({better} is better) on {len(rows)} pairs: "
          f"{with_control.value:.3f} with the new ControlNet, {control_off.value:.3f} with control off")
    path = Path(args.output) / "check.png"
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    print(f"check: condition | with control | control off | target -> {path}")


if __name__ == "__main__":
    sys.exit(main())
