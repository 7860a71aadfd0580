"""Tile: image -> the image downsampled (the tile condition) -> generation under a tile ControlNet, which puts
back the detail the downsampling lost, at the same size. For a larger output, `controlkit.upscale.upscale`
resizes the image up and runs this same ControlNet over it, whole or tile by tile.

    python examples/tile.py                           # a held-out toy scene, 4x downsampled, the demo models
    python examples/tile.py photo.jpg --set down_sampling_rate=2   # your image (demo: at 64 x 64), 2x
    python examples/tile.py photo.jpg --base models/sd15 --controlnet models/control_v11f1e_sd15_tile \\
        --set down_sampling_rate=8 --prompt "a detailed photograph of a cat"   # real checkpoints
"""

import sys

from controlkit.control import Control
from controlkit.demo import examples  # flags, demo-or-your models, the panel PNG: the same for every example
from controlkit.pipeline import generate
from preprocessors.registry import checkpoint_preprocessor

#: Each side divided by 4, as the demo shows tile (the demo ControlNet was trained on rates drawn per sample).
DOWN_SAMPLING_RATE = 4.0


def main(argv: list[str]) -> int:
    args = examples.parse_args("tile", __doc__, argv)
    base, controlnet, metadata = examples.load_models("tile", args)  # the demo's unless --base/--controlnet
    source = examples.load_input("tile", args)  # your image, else a toy scene (demo) or a bundled photo

    # The tile preprocessor the ControlNet names, 4x downsampling over its parameters, --set over both.
    params = {"down_sampling_rate": DOWN_SAMPLING_RATE, **args.params}
    preprocessor = checkpoint_preprocessor("tile", metadata, params)
    blurred = preprocessor(source.image)  # PIL RGB: downsampled, then resized back (bilinear) to the image's size

    control = Control(blurred, controlnet, scale=1.0)
    result = generate(base, source.prompt, [control], steps=args.steps, guidance_scale=args.guidance,
                      seed=args.seed)  # the output size is the condition map's
    path = examples.save_panels([source.image, blurred, result.images[0]], args.output)
    print(f"tile: input | tile condition | generated -> {path}{source.note}")
    return 0


if __name__ == "__main__":
    sys.exit(examples.run(main))
