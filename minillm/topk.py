"""Deprecated import path, kept for one release: use :mod:`minillm.losses.topk`.

``minillm.topk`` is the same module object as ``minillm.losses.topk`` (so attributes, private helpers and monkeypatching
behave as before); new code should import the new path.
"""

import sys

from .losses import topk as _module

sys.modules[__name__] = _module
