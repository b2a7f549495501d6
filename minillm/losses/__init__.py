"""The loss library: pure tensor functions, their memory-lean chunked twins, and the head plumbing they need.

* :mod:`minillm.losses.core` — the vocabulary-wide losses of DESIGN §4 as pure functions (re-exported here, so
  ``from minillm import losses; losses.single_step_kl(...)`` reads as before);
* :mod:`minillm.losses.chunked` — the same losses from hidden states + an LM head, a chunk of positions at a time;
* :mod:`minillm.losses.fused_head` — chunk gradients taken in forward (no recompute in backward);
* :mod:`minillm.losses.topk` — an offline teacher cache's top-k rows, expanded chunk by chunk;
* :mod:`minillm.losses.heads` — hidden states and the model's own LM head (and its logit post-processing) from a
  stock HF causal LM.

Nothing here imports the samplers, the trainers or DeepSpeed.
"""

from .core import *  # noqa: F401,F403 — the public API of the pure losses
from .core import __all__  # noqa: F401
