"""Pose: image -> an OpenPose-style pose map (mediapipe keypoints) -> generation under a pose ControlNet.

    python examples/pose.py                           # a held-out toy figure and its exact pose, the demo models
    python examples/pose.py me.jpg                    # your photo, through the pose preprocessor (demo: at 64 x 64)
    python examples/pose.py me.jpg --base models/sd15 --controlnet models/control_sd15_openpose \\
        --set hands=true --prompt "a dancer on a stage"         # real checkpoints
"""

import sys

from controlkit.control import Control
from controlkit.demo import examples  # flags, demo-or-your models, the panel PNG: the same for every example
from controlkit.pipeline import generate
from preprocessors.registry import checkpoint_preprocessor


def main(argv: list[str]) -> int:
    args = examples.parse_args("pose", __doc__, argv)
    base, controlnet, metadata = examples.load_models("pose", args)  # the demo's unless --base/--controlnet
    source = examples.load_input("pose", args)  # your image, else a toy figure (demo) or a bundled photo

    if source.exact_map is not None:  # the toy figure: its exact keypoints, drawn as OpenPose draws them
        pose = source.exact_map
    else:  # your image: the pose preprocessor finds the person (no person: a black map and a warning)
        preprocessor = checkpoint_preprocessor("pose", metadata, args.params)
        pose = preprocessor(source.image)  # PIL RGB, coloured limbs on black, the image's size

    control = Control(pose, controlnet, scale=1.0)
    result = generate(base, source.prompt, [control], steps=args.steps, guidance_scale=args.guidance,
                      seed=args.seed)  # the output size is the condition map's
    path = examples.save_panels([source.image, pose, result.images[0]], args.output)
    print(f"pose: input | pose map | generated -> {path}{source.note}")
    return 0


if __name__ == "__main__":
    sys.exit(examples.run(main))
