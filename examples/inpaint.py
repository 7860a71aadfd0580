"""Inpaint: image + mask (white = repaint) -> the image with the masked pixels marked -> generation under an
inpaint ControlNet that repaints the masked region and keeps every other pixel of the image.

    python examples/inpaint.py                        # a held-out toy scene, a random mask (--seed), demo models
    python examples/inpaint.py photo.jpg --mask mask.png   # your image and mask (demo: both at 64 x 64)
    python examples/inpaint.py photo.jpg --mask mask.png --base models/sd15 \\
        --controlnet models/control_v11p_sd15_inpaint --prompt "a wooden bench"   # real checkpoints
"""

import sys

import numpy as np

from controlkit.control import Control
from controlkit.demo import examples  # flags, demo-or-your models, the panel PNG: the same for every example
from controlkit.masks import check_repaints, load_mask, random_mask
from controlkit.pipeline import generate
from preprocessors.registry import checkpoint_preprocessor


def main(argv: list[str]) -> int:
    args = examples.parse_args("inpaint", __doc__, argv, extra_flags=lambda parser: parser.add_argument(
        "--mask", help="mask image, white where repainted; default: a random mask seeded by --seed"))
    base, controlnet, metadata = examples.load_models("inpaint", args)  # the demo's unless --base/--controlnet
    source = examples.load_input("inpaint", args)  # your image, else a toy scene (demo) or a bundled photo

    height, width = source.image.shape[:2]
    if args.mask is not None:  # yours, grey uint8 at the image's size: grey 128 or more is repainted
        mask = load_mask(args.mask, (width, height))
        check_repaints(mask, "--mask")
    else:  # boxes and brush strokes, as the inpaint ControlNets were trained on
        mask = np.where(random_mask((height, width), args.seed), 255, 0).astype(np.uint8)

    # The inpaint preprocessor the ControlNet names: the image as RGBA, alpha 0 where the mask repaints (the model
    # input has -1 there); the panel shows those pixels black.
    masked = np.asarray(checkpoint_preprocessor("inpaint", metadata, args.params)(source.image, mask=mask))
    shown = np.where(masked[..., 3:] == 0, 0, masked[..., :3]).astype(np.uint8)

    control = Control(masked, controlnet, scale=1.0)  # strength=1: the hole starts from noise; the rest is kept
    result = generate(base, source.prompt, [control], steps=args.steps, guidance_scale=args.guidance,
                      seed=args.seed, init_image=source.image, mask=mask, strength=1.0)
    path = examples.save_panels([source.image, shown, result.images[0]], args.output)
    print(f"inpaint: image | masked condition | generated -> {path}{source.note}")
    return 0


if __name__ == "__main__":
    sys.exit(examples.run(main))
