"""Image -> soft edges (HED) -> generation under a softedge ControlNet.

    python examples/softedge.py                         # a toy-world scene with the embedded demo models
    python examples/softedge.py IMAGE --base SD_FOLDER --controlnet CONTROLNET [--set KEY=VALUE ...]

Options: python examples/softedge.py --help (shared by every example: controlkit/demo/examples.py).
"""

import sys

from controlkit.demo.examples import run_example

if __name__ == "__main__":
    sys.exit(run_example("softedge", sys.argv[1:]))
