"""Image -> a depth map (near bright) -> generation under a depth ControlNet.

    python examples/depth.py                         # a toy-world scene with the embedded demo models
    python examples/depth.py IMAGE --base SD_FOLDER --controlnet CONTROLNET [--set KEY=VALUE ...]

Options: python examples/depth.py --help (shared by every example: controlkit/demo/examples.py).
"""

import sys

from controlkit.demo.examples import run_example

if __name__ == "__main__":
    sys.exit(run_example("depth", sys.argv[1:]))
