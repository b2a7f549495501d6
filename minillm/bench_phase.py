"""Deprecated import path, kept for one release: use :mod:`minillm.bench.phase`.

``minillm.bench_phase`` is the same module object as ``minillm.bench.phase`` (so attributes, private helpers and monkeypatching
behave as before); new code should import the new path.
"""

import sys

from .bench import phase as _module

sys.modules[__name__] = _module
