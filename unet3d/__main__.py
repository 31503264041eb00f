"""``python -m unet3d``: see :mod:`unet3d.cli`."""

from unet3d.cli import main

raise SystemExit(main())
