"""Deprecated import path, kept for one release: use :mod:`minillm.losses.fused_head`.

``minillm.fused_head`` is the same module object as ``minillm.losses.fused_head`` (so attributes, private helpers and monkeypatching
behave as before); new code should import the new path.
"""

import sys

from .losses import fused_head as _module

sys.modules[__name__] = _module
