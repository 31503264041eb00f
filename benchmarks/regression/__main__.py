"""``python -m benchmarks.regression``: the benchmark's command line (:mod:`.cli`)."""

from .cli import main

raise SystemExit(main())
