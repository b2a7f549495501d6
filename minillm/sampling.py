"""Deprecated import path, kept for one release: use :mod:`minillm.generation.sampling`.

``minillm.sampling`` is the same module object as ``minillm.generation.sampling`` (so attributes, private helpers and monkeypatching
behave as before); new code should import the new path.
"""

import sys

from .generation import sampling as _module

sys.modules[__name__] = _module
