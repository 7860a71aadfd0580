"""Normal: image -> a surface normal map -> generation under a normal ControlNet.

    python examples/normal.py                         # a held-out toy scene and its exact normals, the demo models
    python examples/normal.py room.jpg --set depth_model=models/dpt-hybrid-midas   # your image, a depth model
    python examples/normal.py room.jpg --base models/sd15 --controlnet models/control_sd15_normal \\
        --set depth_model=Intel/dpt-hybrid-midas --prompt "a kitchen"      # real checkpoints
"""

import sys

from controlkit.control import Control
from controlkit.demo import examples  # flags, demo-or-your models, the panel PNG: the same for every example
from controlkit.pipeline import generate
from preprocessors.registry import checkpoint_preprocessor


def main(argv: list[str]) -> int:
    args = examples.parse_args("normal", __doc__, argv)
    base, controlnet, metadata = examples.load_models("normal", args)  # the demo's unless --base/--controlnet
    source = examples.load_input("normal", args)  # your image, else a toy scene (demo) or a bundled photo

    if source.exact_map is not None:  # the toy scene: the renderer's own normals (no depth model ships offline)
        normals = source.exact_map
    else:  # your image: normals from a depth model (--set depth_model=...), or NormalBAE (--set model=bae)
        preprocessor = checkpoint_preprocessor("normal", metadata, args.params)
        normals = preprocessor(source.image)  # PIL RGB, R towards the viewer, G up, B left; the image's size

    control = Control(normals, controlnet, scale=1.0)
    result = generate(base, source.prompt, [control], steps=args.steps, guidance_scale=args.guidance,
                      seed=args.seed)  # the output size is the condition map's
    path = examples.save_panels([source.image, normals, result.images[0]], args.output)
    print(f"normal: input | normal map | generated -> {path}{source.note}")
    return 0


if __name__ == "__main__":
    sys.exit(examples.run(main))
