"""Train a ControlNet the way the ControlNet tutorial does (fill50k: circle outline -> filled circle), on the CPU, on
top of the embedded demo base model; then the same on a folder of your own.

    python examples/train_fill50k.py                               # render 2000 circles, train, check
    python examples/train_fill50k.py --folder my_pairs             # ROOT/images, ROOT/conditions, captions
    python examples/train_fill50k.py --folder photos --preprocessor canny      # maps computed from the images
    python examples/train_fill50k.py --base models/sd15 --resolution 512       # a real base (use a GPU)

The folder layouts are those of `controlkit train` (docs/training.md): images/<stem>.png with conditions/<stem>.png
and a caption per image (images/<stem>.txt or captions.jsonl), or a manifest.jsonl. After training, the script
generates from the first pair's condition map with the new ControlNet and writes condition | generated | target.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


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
    parser.add_argument("-o", "--output", default="runs/examples/fill50k", help="training output folder")
    args = parser.parse_args(argv)

    from controlkit.demo.models import base_path
    from controlkit.errors import ControlkitError
    from training.config import load_config
    from controlkit.demo.toyworld.dataset import write_dataset
    from training.engine.trainer import train

    output = Path(args.output)
    data = Path(args.folder) if args.folder else write_dataset(output.parent / "fill50k_data", args.circles,
                                                               kind="circles", condition="outline")
    overrides = [
        f"model.base={args.base or base_path()}", f"model.condition={args.preprocessor or 'outline'}",
        f"data.source={data}", f"data.resolution={args.resolution}", f"train.output_dir={output}",
        f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}",
        f"optim.learning_rate={args.learning_rate}", "data.proportion_empty_prompts=0.5",
        "checkpoint.every_steps=0", "checkpoint.resume=latest", "logging.report_to=none",
    ]
    if args.preprocessor:
        overrides.append(f"data.preprocessor={args.preprocessor}")
    start = time.perf_counter()
    try:
        result = train(load_config(None, overrides))
    except ControlkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"trained {result.step} steps in {time.perf_counter() - start:.0f} s -> {result.output}")
    if result.output is not None:
        print(f"check: condition | generated | target -> {check(result.output, data, args)}")
    return 0


def check(controlnet: Path, data: Path, args: argparse.Namespace) -> Path:
    """Generate from the first pair's condition with the trained ControlNet; save condition | generated | target."""
    import numpy as np
    import torch
    from PIL import Image

    from controlkit.control import Control
    from controlkit.demo.models import base_path
    from controlkit.pipeline import generate, load_base
    from training.data.dataset import PairedDataset, load_pairs, make_condition_fn

    base = load_base(args.base or base_path(), torch_dtype=torch.float32)
    condition_fn = make_condition_fn(args.preprocessor) if args.preprocessor else None
    dataset = PairedDataset(load_pairs(data)[:1], resolution=args.resolution, condition_fn=condition_fn)
    item = dataset[0]
    condition = (item["conditioning_pixel_values"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    target = ((item["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    control = Control.from_pretrained(controlnet, condition, unet=base.unet, torch_dtype=base.unet.dtype)
    generated = generate(base, item["prompt"], [control], steps=20, guidance_scale=2.0, seed=0,
                         width=args.resolution, height=args.resolution, output_type="np").images[0]
    generated = (np.clip(generated, 0, 1) * 255).round().astype(np.uint8)
    path = Path(args.output) / "check.png"
    Image.fromarray(np.concatenate([condition, generated, target], axis=1)).save(path)
    return path


if __name__ == "__main__":
    sys.exit(main())
