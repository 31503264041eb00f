"""``python -m cohorts``: see :mod:`cohorts.cli` (through its front, :mod:`cohorts.entry`,
which names the extra to install when SciPy or nilearn is missing)."""

from cohorts.entry import main

raise SystemExit(main())
