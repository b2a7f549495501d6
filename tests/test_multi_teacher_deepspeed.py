"""Multi-teacher routing on 2 DeepSpeed ranks (gloo, CPU), with sampling on (what users run): ZeRO-3 shards the
student and BOTH teachers, and the run equals the 2-rank ZeRO-0 run (replicated weights) step by step — losses,
rewards, per-teacher metrics (dev ones included) — and in its final weights, over phases routed to different teachers.

Both runs draw the same per-rank samples: the rollout generator of a phase is seeded by (seed, phase, rank), and
ZeRO-3 gathers the same full weights ZeRO-0 holds. (Under ZeRO-3 a teacher forward gathers that teacher's shards,
a collective: a rank running the other teacher at the same moment would hang, so this also checks that the phase's
teacher is the same on both ranks.) The local strategy's equality with ZeRO-0 is tests/test_deepspeed.py's."""

import pytest

from test_deepspeed import REPO, launch, losses

pytestmark = pytest.mark.distributed

# 4 steps = 2 phases of 8 rollouts (4 per rank), one optimizer step per PPO epoch; with seed 10 phase 0 is routed
# to `facts`, phase 1 to `language`. Sampled teacher-mixed rollouts and the reference's global whitening.
ARGS = ["--config", "configs/tiny/minillm.yaml", "train.max_steps=4", "train.micro_batch_size=1",
        "train.global_batch_size=8", "rollout.num_rollouts=8", "rollout.chunk_size=4", "minillm.ppo_epochs=2",
        "rollout.teacher_mix_alpha=0.2", "rollout.do_sample=true", "minillm.whiten=global",
        "train.save_interval=0", "logging.log_interval=1", "train.select_best_by=none",
        # sampled dev evaluation at step 4 of 5 routed prompts (3 + 3 on two ranks, the last a padding repeat): every
        # teacher scores every dev batch on both ranks, for the per-teacher dev metrics
        "train.eval_interval=4", "data.dev=tests/assets/data/routed.jsonl", "eval.num_prompts=5", "eval.batch_size=2",
        "eval.max_new_tokens=8",
        "teacher.path=", "data.train=tests/assets/data/routed.jsonl",
        "teachers=[{name: language, path: tests/assets/teacher}, {name: facts, path: tests/assets/teacher-b}]",
        "routing.routes={language: language, facts: facts}", "strategy.backend=deepspeed"]


def test_multi_teacher_sampled_zero3_on_two_ranks_equals_zero0(tmp_path):
    from safetensors.torch import load_file

    runs = {stage: tmp_path / f"zero{stage}" for stage in (0, 3)}
    for stage, out in runs.items():
        launch([*ARGS, f"output_dir={out}", f"strategy.zero_stage={stage}"], nproc=2, timeout=120)
    keys = ("train/loss", "train/pg_loss", "train/single_step_kl", "train/pt_loss", "rollout/reward",
            "train/teacher_index")
    for key in keys:
        ref, got = losses(runs[0], key), losses(runs[3], key)
        assert [s for s, _ in ref] == [s for s, _ in got] == [1, 2, 3, 4], key
        for (_, a), (_, b) in zip(ref, got):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-5), key
    assert [v for _, v in losses(runs[0], "train/teacher_index")] == [1.0, 1.0, 0.0, 0.0]
    for name in ("language", "facts"):
        for key in ("reward", "reverse_kl_k3", "teacher_logprob", "routed_tokens"):
            ref, got = losses(runs[0], f"teacher/{name}/{key}"), losses(runs[3], f"teacher/{name}/{key}")
            assert ref and [s for s, _ in ref] == [s for s, _ in got], (name, key)
            for (_, a), (_, b) in zip(ref, got):
                assert b == pytest.approx(a, rel=1e-4, abs=1e-5), (name, key)
    for name in ("language", "facts"):
        for key in ("reverse_kl_k3", "teacher_logprob", "records"):
            ref, got = losses(runs[0], f"dev/teacher/{name}/{key}"), losses(runs[3], f"dev/teacher/{name}/{key}")
            assert [s for s, _ in ref] == [s for s, _ in got] == [4], (name, key)
            assert got[0][1] == pytest.approx(ref[0][1], rel=1e-4, abs=1e-5), (name, key)
    assert sum(losses(runs[0], f"dev/teacher/{n}/records")[0][1] for n in ("language", "facts")) == 5
    # 8 rollouts a phase, so the counters after phase 0 (facts) and phase 1 (language) are exact
    last = [r for _, r in losses(runs[0], "teacher/facts/routed_rollouts")][-1]
    assert last == 8 and [r for _, r in losses(runs[0], "teacher/language/routed_rollouts")][-1] == 8
    start = load_file(str(REPO / "tests" / "assets" / "student" / "model.safetensors"))
    finals = {stage: load_file(str(out / "final" / "model.safetensors")) for stage, out in runs.items()}
    assert finals[0].keys() == finals[3].keys()
    moved = max(float((finals[0][k].float() - start[k].float()).abs().max()) for k in start if k in finals[0])
    differ = max(float((finals[0][k].float() - finals[3][k].float()).abs().max()) for k in finals[0])
    assert moved > 1e-3 and differ <= 1e-4 * max(1.0, moved), (moved, differ)
