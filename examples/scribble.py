"""Scribble: image -> a binary scribble (white strokes on black) -> generation under a scribble ControlNet.

    python examples/scribble.py                       # a held-out toy scene, the embedded demo models
    python examples/scribble.py photo.jpg             # your image (the demo models work at 64 x 64)
    python examples/scribble.py drawing.png --set method=xdog  # your hand-drawn scribble, dark strokes on white
    python examples/scribble.py photo.jpg --base models/sd15 --controlnet models/control_v11p_sd15_scribble \\
        --set method=hed --prompt "a cottage by a lake"        # real checkpoints
"""

import sys

from controlkit.control import Control
from controlkit.demo import examples  # flags, demo-or-your models, the panel PNG: the same for every example
from controlkit.pipeline import generate
from preprocessors.registry import checkpoint_preprocessor


def main(argv: list[str]) -> int:
    args = examples.parse_args("scribble", __doc__, argv)
    base, controlnet, metadata = examples.load_models("scribble", args)  # the demo's unless --base/--controlnet
    source = examples.load_input("scribble", args)  # your image, else a toy scene (demo) or a bundled photo

    # The scribble the ControlNet was trained with (the demo's: HED soft edges, thinned and thresholded), --set
    # over it. --set method=xdog (no weights) keeps the strokes that are darker than around them: that turns a
    # photo into a sketch, and a hand drawing (dark pen on white paper) into the white-on-black map as it is.
    preprocessor = checkpoint_preprocessor("scribble", metadata, args.params)
    scribble = preprocessor(source.image)  # PIL RGB, white strokes on black, binary, the image's size

    control = Control(scribble, controlnet, scale=1.0)
    result = generate(base, source.prompt, [control], steps=args.steps, guidance_scale=args.guidance,
                      seed=args.seed)  # the output size is the condition map's
    path = examples.save_panels([source.image, scribble, result.images[0]], args.output)
    print(f"scribble: input | scribble | generated -> {path}{source.note}")
    return 0


if __name__ == "__main__":
    sys.exit(examples.run(main))
