"""``python -m dwp``: the ``dwp`` command line (:mod:`dwp.cli`)."""

from .cli import main

raise SystemExit(main())
