"""``minillm-bench``: the benchmark code (timings of every phase of a MiniLLM step, naive and fast side by side).

* :mod:`minillm.bench.parts` — rollout, scoring, training-step and single-step-KL timings, the device's measured
  ceilings (``run_benchmark``, ``measure_ceilings``, re-exported here);
* :mod:`minillm.bench.phase` — whole measured phases through ``MiniLLMTrainer.run_phase``;
* :mod:`minillm.bench.kl` — the single-step KL at a target shape (memory and speed).
"""

from .parts import measure_ceilings, run_benchmark

__all__ = ["run_benchmark", "measure_ceilings"]
