"""Deprecated import path, kept for one release: use :mod:`minillm.losses.chunked`.

``minillm.chunked_losses`` is the same module object as ``minillm.losses.chunked`` (so attributes, private helpers and monkeypatching
behave as before); new code should import the new path.
"""

import sys

from .losses import chunked as _module

sys.modules[__name__] = _module
