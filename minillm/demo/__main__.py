"""``python -m minillm.demo``: run the demo pipeline (see :mod:`minillm.demo.cli`)."""

import sys

from .cli import main

sys.exit(main())
