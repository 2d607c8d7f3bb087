"""``python -m pipeline.cli``: the ``cessl`` command."""

import sys

from pipeline.cli import main

sys.exit(main())
