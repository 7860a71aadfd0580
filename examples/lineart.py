"""Image -> line art (the weight-free standard line art) -> generation under a lineart ControlNet.

    python examples/lineart.py                         # a toy-world scene with the embedded demo models
    python examples/lineart.py IMAGE --base SD_FOLDER --controlnet CONTROLNET [--set KEY=VALUE ...]

Options: python examples/lineart.py --help (shared by every example: controlkit/demo/examples.py).
"""

import sys

from controlkit.demo.examples import run_example

if __name__ == "__main__":
    sys.exit(run_example("lineart", sys.argv[1:]))
