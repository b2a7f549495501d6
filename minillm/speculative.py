"""Deprecated import path, kept for one release: use :mod:`minillm.generation.speculative`.

``minillm.speculative`` is the same module object as ``minillm.generation.speculative`` (so attributes, private helpers and monkeypatching
behave as before); new code should import the new path.
"""

import sys

from .generation import speculative as _module

sys.modules[__name__] = _module
