"""``python -m benchmarks.transfer``."""

from .cli import main

raise SystemExit(main())
