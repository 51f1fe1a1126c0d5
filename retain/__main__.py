"""``python -m retain ...``: the ``retain`` command (what ``torchrun ... -m retain run PRESET`` starts)."""

import sys

from retain.cli import main

if __name__ == "__main__":
    sys.exit(main())
