"""``python -m pipeline.cli``: the ``cessl`` command line."""

import sys

from pipeline.cli import main

sys.exit(main())
