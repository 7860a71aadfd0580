"""Depth: image -> a depth map (near is bright) -> generation under a depth ControlNet.

    python examples/depth.py                          # a held-out toy scene and its exact depth, the demo models
    python examples/depth.py room.jpg --set model=models/dpt-hybrid-midas      # your image, a local depth model
    python examples/depth.py room.jpg --base models/sd15 --controlnet models/control_sd15_depth \\
        --set model=Intel/dpt-hybrid-midas --prompt "a cosy room"          # real checkpoints
"""

import sys

from controlkit.control import Control
from controlkit.demo import examples  # flags, demo-or-your models, the panel PNG: the same for every example
from controlkit.pipeline import generate
from preprocessors.registry import checkpoint_preprocessor


def main(argv: list[str]) -> int:
    args = examples.parse_args("depth", __doc__, argv)
    base, controlnet, metadata = examples.load_models("depth", args)  # the demo's unless --base/--controlnet
    source = examples.load_input("depth", args)  # your image, else a toy scene (demo) or a bundled photo

    if source.exact_map is not None:  # the toy scene: the renderer's own depth (no depth model ships offline)
        depth = source.exact_map
    else:  # your image: the depth preprocessor (a DPT or Depth Anything model: --set model=FOLDER_OR_HUB_ID)
        preprocessor = checkpoint_preprocessor("depth", metadata, args.params)
        depth = preprocessor(source.image)  # PIL RGB, grey, near bright, the image's size

    control = Control(depth, controlnet, scale=1.0)
    result = generate(base, source.prompt, [control], steps=args.steps, guidance_scale=args.guidance,
                      seed=args.seed)  # the output size is the condition map's
    path = examples.save_panels([source.image, depth, result.images[0]], args.output)
    print(f"depth: input | depth map | generated -> {path}{source.note}")
    return 0


if __name__ == "__main__":
    sys.exit(examples.run(main))
