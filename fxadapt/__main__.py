"""``python -m fxadapt``: the command line (see :mod:`fxadapt.cli`)."""

import sys

from .cli import main

sys.exit(main())
