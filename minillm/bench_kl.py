"""Deprecated import path, kept for one release: use :mod:`minillm.bench.kl`.

``minillm.bench_kl`` is the same module object as ``minillm.bench.kl`` (so attributes, private helpers and monkeypatching
behave as before); new code should import the new path.
"""

import sys

from .bench import kl as _module

sys.modules[__name__] = _module
