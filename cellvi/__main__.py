"""``python -m cellvi``: the ``cellvi`` command line."""

from .cli import main

raise SystemExit(main())
