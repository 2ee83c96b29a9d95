"""``python -m nerveseg``: the same CLI as the ``nerveseg`` command (for machines where it is not installed)."""

import sys

from nerveseg.cli.main import main

sys.exit(main())
