"""Soft edges: image -> HED soft edges -> generation under a softedge ControlNet.

    python examples/softedge.py                       # a held-out toy scene, the embedded demo models
    python examples/softedge.py photo.jpg             # your image (the demo models work at 64 x 64)
    python examples/softedge.py photo.jpg --base models/sd15 --controlnet models/control_v11p_sd15_softedge \\
        --set safe=true --prompt "a garden in spring"           # real checkpoints
"""

import sys

from controlkit.control import Control
from controlkit.demo import examples  # flags, demo-or-your models, the panel PNG: the same for every example
from controlkit.pipeline import generate
from preprocessors.registry import checkpoint_preprocessor


def main(argv: list[str]) -> int:
    args = examples.parse_args("softedge", __doc__, argv)
    base, controlnet, metadata = examples.load_models("softedge", args)  # the demo's unless --base/--controlnet
    source = examples.load_input("softedge", args)  # your image, else a toy scene (demo) or a bundled photo

    # The preprocessor the ControlNet was trained with (the demo's ran HED at 128 px), --set over its parameters.
    preprocessor = checkpoint_preprocessor("softedge", metadata, args.params)
    soft_edges = preprocessor(source.image)  # PIL RGB, grey edge strength on black, the image's size

    control = Control(soft_edges, controlnet, scale=1.0)
    result = generate(base, source.prompt, [control], steps=args.steps, guidance_scale=args.guidance,
                      seed=args.seed)  # the output size is the condition map's
    path = examples.save_panels([source.image, soft_edges, result.images[0]], args.output)
    print(f"softedge: input | soft edges | generated -> {path}{source.note}")
    return 0


if __name__ == "__main__":
    sys.exit(examples.run(main))
