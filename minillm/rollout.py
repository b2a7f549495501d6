"""Deprecated import path, kept for one release: use :mod:`minillm.generation.rollout`.

``minillm.rollout`` is the same module object as ``minillm.generation.rollout`` (so attributes, private helpers and monkeypatching
behave as before); new code should import the new path.
"""

import sys

from .generation import rollout as _module

sys.modules[__name__] = _module
