"""Deprecated import path, kept for one release: use :mod:`minillm.losses.heads`.

``minillm.chunking`` is the same module object as ``minillm.losses.heads`` (so attributes, private helpers and monkeypatching
behave as before); new code should import the new path.
"""

import sys

from .losses import heads as _module

sys.modules[__name__] = _module
