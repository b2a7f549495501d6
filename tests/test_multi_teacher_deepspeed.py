"""Multi-teacher routing on 2 DeepSpeed ranks (gloo, CPU): ZeRO-3 shards the student and BOTH teachers, and the run
gives the local strategy's losses and per-teacher metrics step by step, over phases routed to different teachers.
(Under ZeRO-3 a teacher forward gathers that teacher's shards, a collective: a rank running the other teacher at the
same moment would hang, so this also checks that the phase's teacher is the same on both ranks.)"""

import pytest

from test_deepspeed import COMMON, launch, losses

pytestmark = pytest.mark.distributed

# 4 steps = 2 phases; with seed 10 phase 0 is routed to `facts`, phase 1 to `language`. Greedy decoding of the
# teacher-mixed p~ makes rollouts depend on the prompts only, so 1 and 2 ranks see the same samples.
ARGS = [*COMMON["minillm"], "teacher.path=", "data.train=tests/assets/data/routed.jsonl",
        "teachers=[{name: language, path: tests/assets/teacher}, {name: facts, path: tests/assets/teacher-b}]",
        "routing.routes={language: language, facts: facts}", "train.eval_interval=0", "train.select_best_by=none"]


def test_multi_teacher_zero3_on_two_ranks_matches_local(tmp_path):
    local, zero3 = tmp_path / "local", tmp_path / "zero3"
    launch([*ARGS, f"output_dir={local}"], nproc=1, timeout=120)
    launch([*ARGS, f"output_dir={zero3}", "strategy.backend=deepspeed", "strategy.zero_stage=3"], nproc=2, timeout=120)
    keys = ("train/loss", "train/pg_loss", "train/single_step_kl", "train/pt_loss", "rollout/reward",
            "train/teacher_index")
    for key in keys:
        ref, got = losses(local, key), losses(zero3, key)
        assert [s for s, _ in ref] == [s for s, _ in got] == [1, 2, 3, 4], key
        for (_, a), (_, b) in zip(ref, got):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-5), key
    assert [v for _, v in losses(local, "train/teacher_index")] == [1.0, 1.0, 0.0, 0.0]
    for name in ("language", "facts"):
        for key in ("reward", "reverse_kl_k3", "teacher_logprob", "routed_tokens"):
            ref, got = losses(local, f"teacher/{name}/{key}"), losses(zero3, f"teacher/{name}/{key}")
            assert ref and [s for s, _ in ref] == [s for s, _ in got], (name, key)
            for (_, a), (_, b) in zip(ref, got):
                assert b == pytest.approx(a, rel=1e-4, abs=1e-5), (name, key)
