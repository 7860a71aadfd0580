"""Image -> an OpenPose-style pose map (mediapipe keypoints) -> generation under a pose ControlNet.

    python examples/pose.py                         # a toy-world scene with the embedded demo models
    python examples/pose.py IMAGE --base SD_FOLDER --controlnet CONTROLNET [--set KEY=VALUE ...]

Options: python examples/pose.py --help (shared by every example: controlkit/demo/examples.py).
"""

import sys

from controlkit.demo.examples import run_example

if __name__ == "__main__":
    sys.exit(run_example("pose", sys.argv[1:]))
