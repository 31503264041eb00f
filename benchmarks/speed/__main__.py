"""``python -m benchmarks.speed``: run the speed benchmark (see :mod:`benchmarks.speed`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
