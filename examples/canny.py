"""Image -> Canny edges (OpenCV) -> generation under a canny ControlNet.

    python examples/canny.py                         # a toy-world scene with the embedded demo models
    python examples/canny.py IMAGE --base SD_FOLDER --controlnet CONTROLNET [--set KEY=VALUE ...]

Options: python examples/canny.py --help (shared by every example: controlkit/demo/examples.py).
"""

import sys

from controlkit.demo.examples import run_example

if __name__ == "__main__":
    sys.exit(run_example("canny", sys.argv[1:]))
