"""The embedded MiniLLM demo: distil SmolLM2-135M-Instruct into a layer-pruned student on a laptop CPU.

``bash scripts/demo.sh`` (or ``python -m minillm.demo``) runs the library's main job end to end, offline:
the teacher answers real prompts (``minillm-generate``), the student is warm-started by SFT on those answers,
trained further with MiniLLM, and all three models are compared with ``minillm-eval``. See
:mod:`minillm.demo.pipeline`. This ``__init__`` imports nothing heavy.
"""
