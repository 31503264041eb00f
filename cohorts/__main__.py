"""``python -m cohorts``: see :mod:`cohorts.cli`."""

from cohorts.cli import main

raise SystemExit(main())
