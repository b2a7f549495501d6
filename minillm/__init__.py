"""minillm: distil large language models into small ones with MiniLLM (reverse-KL policy-gradient KD).

The package is importable without DeepSpeed: heavy and optional dependencies (deepspeed, wandb,
tensorboard) are imported inside the functions that need them.

    from minillm.config import load_config
    from minillm import losses
    from minillm.trainers import SFTTrainer

**Map.** Dependencies point one way, down this list (tests/test_layout.py checks there is no import cycle):

* ``cli/`` — thin command-line entry points (``minillm-train``, ``-eval``, ``-generate``, ``-data``, ``-compare``,
  ``-bench``, ``-teacher-cache``, ``-check``, ``-teacher-serve``); ``demo/`` — the SmolLM2 demo pipeline;
* ``trainers/`` — ``SFTTrainer`` (sft, kd, seqkd, GKD/DistiLLM student data) and ``MiniLLMTrainer``;
  ``evaluation/`` — the paper's protocol and analyses; ``bench/`` — ``minillm-bench``; ``compare``, ``preflight``,
  ``device_check`` — the tools built on them;
* ``generation/`` — the samplers of teacher-mixed rollouts (naive, fast, speculative), the ``Rollout`` record and its
  scoring;
* ``losses/`` — the pure losses of DESIGN §4, their chunked twins, the fused head, top-k teacher rows and the
  hidden-state/LM-head plumbing; ``data/`` — instruction sets, templates, pre-training corpora, teacher caches;
  ``serve/`` — the teacher server (``minillm-teacher-serve``) and the trainer's ``RemoteTeacher`` (``teacher.server``);
  ``routing`` — multi-teacher routing (``teachers:``): each record's teacher, the per-phase/per-step schedule;
* ``config``, ``models``, ``strategy`` (local torch / DeepSpeed), ``adapters`` (LoRA students and adapter folders
  through peft; its config section: ``adapter_config``), ``checkpoint``, ``optim``, ``tracking``, ``runtime``,
  ``errors`` — the bottom layer.

The old flat module paths (``minillm.chunked_losses``, ``minillm.engine``, ``minillm.sampling``, ``minillm.rollout``,
``minillm.chunking``, ``minillm.topk``, ``minillm.fused_head``, ``minillm.speculative``, ``minillm.bench_phase``,
``minillm.bench_kl``) still import, as aliases of the new modules, for one release.
"""

__version__ = "0.1.0"
