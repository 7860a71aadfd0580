"""MLSD: image -> straight line segments (white, 1 px, on black) -> generation under an MLSD ControlNet.

The demo has no MLSD ControlNet: without --base and --controlnet this example only annotates (input | line
segments); generating needs an MLSD ControlNet such as control_v11p_sd15_mlsd.

    python examples/mlsd.py                           # a held-out toy scene, annotated only
    python examples/mlsd.py room.jpg --set min_length=20     # your image, segments 20 px or longer
    python examples/mlsd.py room.jpg --base models/sd15 --controlnet models/control_v11p_sd15_mlsd \\
        --prompt "a modern living room"                         # real checkpoints: annotate and generate
"""

import sys

from controlkit.control import Control
from controlkit.demo import examples  # flags, demo-or-your models, the panel PNG: the same for every example
from controlkit.pipeline import generate
from preprocessors.registry import checkpoint_preprocessor


def main(argv: list[str]) -> int:
    args = examples.parse_args("mlsd", __doc__, argv)
    source = examples.load_input("mlsd", args)  # your image, else a toy scene (demo) or a bundled photo
    if args.controlnet is None:  # no demo MLSD ControlNet: the line segments only, found at the image's 64 px
        # (1-pixel lines drawn at the default 512 would fade out when resized back to 64)
        lines = checkpoint_preprocessor("mlsd", None, {"detect_resolution": None, **args.params})(source.image)
        path = examples.save_panels([source.image, lines], args.output)
        print(f"mlsd: input | line segments -> {path}{source.note}")
        print("mlsd: generation needs --base and --controlnet (an MLSD ControlNet, e.g. control_v11p_sd15_mlsd)")
        return 0
    base, controlnet, metadata = examples.load_models("mlsd", args)

    # The preprocessor the ControlNet names (OpenCV's line segment detector, drawn as M-LSD maps), --set over it.
    preprocessor = checkpoint_preprocessor("mlsd", metadata, args.params)
    lines = preprocessor(source.image)  # PIL RGB, white straight lines on black, the image's size

    control = Control(lines, controlnet, scale=1.0)
    result = generate(base, source.prompt, [control], steps=args.steps, guidance_scale=args.guidance,
                      seed=args.seed)  # the output size is the condition map's
    path = examples.save_panels([source.image, lines, result.images[0]], args.output)
    print(f"mlsd: input | line segments | generated -> {path}{source.note}")
    return 0


if __name__ == "__main__":
    sys.exit(examples.run(main))
