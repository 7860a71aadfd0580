"""Canny: image -> Canny edges (OpenCV) -> generation under a canny ControlNet.

    python examples/canny.py                          # a held-out toy scene, the embedded demo models
    python examples/canny.py photo.jpg                # your image (the demo models work at 64 x 64)
    python examples/canny.py photo.jpg --base models/sd15 --controlnet models/control_sd15_canny \\
        --set low_threshold=50 --prompt "a house at dusk"       # real checkpoints
"""

import sys

from controlkit.control import Control
from controlkit.demo import examples  # flags, demo-or-your models, the panel PNG: the same for every example
from controlkit.pipeline import generate
from preprocessors.registry import checkpoint_preprocessor


def main(argv: list[str]) -> int:
    args = examples.parse_args("canny", __doc__, argv)
    base, controlnet, metadata = examples.load_models("canny", args)  # the demo's unless --base/--controlnet
    source = examples.load_input("canny", args)  # your image, else a toy scene (demo) or a bundled photo

    # The preprocessor the ControlNet was trained with (its metadata says which, and its thresholds), --set over it.
    preprocessor = checkpoint_preprocessor("canny", metadata, args.params)
    edges = preprocessor(source.image)  # PIL RGB, white edges on black, the image's size

    control = Control(edges, controlnet, scale=1.0)
    result = generate(base, source.prompt, [control], steps=args.steps, guidance_scale=args.guidance,
                      seed=args.seed)  # the output size is the condition map's
    path = examples.save_panels([source.image, edges, result.images[0]], args.output)
    print(f"canny: input | edges | generated -> {path}{source.note}")
    return 0


if __name__ == "__main__":
    sys.exit(examples.run(main))
