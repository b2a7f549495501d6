"""Deprecated import path, kept for one release: use :mod:`minillm.generation.engine` (the fast engine) and
:mod:`minillm.generation.dispatch` (``sample_rollouts``, ``ENGINES``).

``minillm.engine`` is the same module object as ``minillm.generation.engine``, with the dispatcher's two names
added to it for old callers.
"""

import sys

from .generation import engine as _module
from .generation.dispatch import ENGINES, sample_rollouts

_module.ENGINES, _module.sample_rollouts = ENGINES, sample_rollouts
sys.modules[__name__] = _module
