"""Image -> a surface normal map -> generation under a normal ControlNet.

    python examples/normal.py                         # a toy-world scene with the embedded demo models
    python examples/normal.py IMAGE --base SD_FOLDER --controlnet CONTROLNET [--set KEY=VALUE ...]

Options: python examples/normal.py --help (shared by every example: controlkit/demo/examples.py).
"""

import sys

from controlkit.demo.examples import run_example

if __name__ == "__main__":
    sys.exit(run_example("normal", sys.argv[1:]))
