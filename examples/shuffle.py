"""Shuffle: a reference image -> its content shuffled (a seeded random flow field) -> generation under a
shuffle ControlNet, which takes the reference's colours and textures but not its layout.

    python examples/shuffle.py                        # a held-out toy scene, the embedded demo models
    python examples/shuffle.py style.jpg --set seed=3      # your reference (demo: at 64 x 64), another flow
    python examples/shuffle.py style.jpg --base models/sd15 --controlnet models/control_v11e_sd15_shuffle \\
        --prompt "a city street at night"                       # real checkpoints
"""

import sys

from controlkit.control import Control
from controlkit.demo import examples  # flags, demo-or-your models, the panel PNG: the same for every example
from controlkit.pipeline import generate
from preprocessors.registry import checkpoint_preprocessor


def main(argv: list[str]) -> int:
    args = examples.parse_args("shuffle", __doc__, argv)
    base, controlnet, metadata = examples.load_models("shuffle", args)  # the demo's unless --base/--controlnet
    source = examples.load_input("shuffle", args)  # your image, else a toy scene (demo) or a bundled photo

    # The shuffle preprocessor the ControlNet names (its cell size, its resolution), --set over it; the flow field
    # is seeded (--set seed=N, default 0), so the same seed shuffles every image the same way.
    preprocessor = checkpoint_preprocessor("shuffle", metadata, args.params)
    shuffled = preprocessor(source.image)  # PIL RGB, the image's colours and textures, moved about

    # The shuffle ControlNet pools its outputs globally (config `global_pool_conditions`): it says what the image
    # should look like, not where things are. Such a Control acts on the conditional side of guidance only, by
    # itself: nothing to set here.
    control = Control(shuffled, controlnet, scale=1.0)
    result = generate(base, source.prompt, [control], steps=args.steps, guidance_scale=args.guidance,
                      seed=args.seed)  # the output size is the condition map's
    path = examples.save_panels([source.image, shuffled, result.images[0]], args.output)
    print(f"shuffle: reference | shuffled | generated -> {path}{source.note}")
    return 0


if __name__ == "__main__":
    sys.exit(examples.run(main))
