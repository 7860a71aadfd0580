"""Line art: image -> line art (the weight-free 'standard' line art) -> generation under a lineart ControlNet.

    python examples/lineart.py                        # a held-out toy scene, the embedded demo models
    python examples/lineart.py drawing.png            # your image (the demo models work at 64 x 64)
    python examples/lineart.py photo.jpg --base models/sd15 --controlnet models/control_v11p_sd15_lineart \\
        --set model=realistic --set weights=Annotators/sk_model.pth --prompt "a castle"   # real checkpoints
"""

import sys

from controlkit.control import Control
from controlkit.demo import examples  # flags, demo-or-your models, the panel PNG: the same for every example
from controlkit.pipeline import generate
from preprocessors.registry import checkpoint_preprocessor


def main(argv: list[str]) -> int:
    args = examples.parse_args("lineart", __doc__, argv)
    base, controlnet, metadata = examples.load_models("lineart", args)  # the demo's unless --base/--controlnet
    source = examples.load_input("lineart", args)  # your image, else a toy scene (demo) or a bundled photo

    # The preprocessor the ControlNet was trained with (its metadata names it), your --set parameters over its own.
    preprocessor = checkpoint_preprocessor("lineart", metadata, args.params)
    lines = preprocessor(source.image)  # PIL RGB, white lines on black, the image's size

    control = Control(lines, controlnet, scale=1.0)
    result = generate(base, source.prompt, [control], steps=args.steps, guidance_scale=args.guidance,
                      seed=args.seed)  # the output size is the condition map's
    path = examples.save_panels([source.image, lines, result.images[0]], args.output)
    print(f"lineart: input | line art | generated -> {path}{source.note}")
    return 0


if __name__ == "__main__":
    sys.exit(examples.run(main))
