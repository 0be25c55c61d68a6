"""``python -m refsd``: the same as the ``refsd`` console script."""

import sys

from refsd.cli import main

if __name__ == "__main__":
    sys.exit(main())
