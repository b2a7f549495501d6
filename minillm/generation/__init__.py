"""Generation: teacher-mixed sampling, the rollout record and its scoring.

* :mod:`minillm.generation.sampling` — the naive exact sampler of p̃ = (1−α)·q + α·p (both models every step), the
  warpers, teacher-forced log-probs;
* :mod:`minillm.generation.engine` — the fast exact engine (per-step coins, each model runs only on its steps;
  static caches and CUDA-graph decode steps on CUDA);
* :mod:`minillm.generation.speculative` — the speculative engine (student drafts, teacher verifies);
* :mod:`minillm.generation.dispatch` — ``rollout.engine``: ``sample_rollouts`` over the three;
* :mod:`minillm.generation.rollout` — the typed :class:`Rollout` record and ``score_samples``.

Depends on :mod:`minillm.losses`; never on the trainers.
"""
