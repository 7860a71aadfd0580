"""`python -m controlkit` is the `controlkit` command."""

import sys

from controlkit.cli import main

sys.exit(main())
