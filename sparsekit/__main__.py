"""``python -m sparsekit``: the command line (so ``torchrun -m sparsekit prune ...`` works)."""

import sys

from sparsekit.cli import main

sys.exit(main())
