"""``python -m cellvi.cli``."""

from . import main

raise SystemExit(main())
