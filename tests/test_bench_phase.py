"""The measured whole phase (minillm.bench.phase, ``minillm-bench --phase``).

Oracles: at α ∈ {0, 1} the naive and fast engines draw the same tokens from the same generator, and chunked
losses and reused teacher states equal the plain ones, so one whole phase under the naive and the fast
configuration must train the same student; step counts and token counts follow from the setup; the student is
given back with its starting weights; the PT cache's size is its layout.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_sampling import tiny_llama

from minillm.bench.phase import PhaseSetup, RandomTokenCorpus, measure_phases, phase_trainer, random_prompts
from minillm.cli.bench import main as bench_main

VOCAB = 40
SETUP = dict(num_rollouts=8, chunk_size=4, micro_batch=4, ppo_epochs=2, prompt_len=6, new_tokens=5, pt_seq_length=9,
             loss_chunk_size=7)


@pytest.fixture(scope="module")
def models():
    return tiny_llama(VOCAB, seed=1), tiny_llama(VOCAB, seed=2, hidden_size=48, intermediate_size=96)


def phase_data(setup: PhaseSetup):
    """The prompts and PT chunks every test phase runs on."""
    return (random_prompts(VOCAB, setup.num_rollouts, setup.prompt_len, seed=0),
            RandomTokenCorpus(VOCAB, setup.pt_chunks_per_phase, setup.pt_seq_length, seed=1))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_naive_and_fast_configurations_train_the_same_student_in_one_phase(models, alpha, tmp_path):
    student0, teacher = models
    setup = PhaseSetup(alpha=alpha, **SETUP)
    prompts, corpus = phase_data(setup)
    finals, stats = {}, {}
    for variant in ("naive", "fast", "speculative"):
        student = copy.deepcopy(student0)
        trainer = phase_trainer(student, teacher, setup, variant, str(tmp_path / variant), prompts, corpus)
        m = trainer.cfg.minillm
        assert (trainer.cfg.rollout.engine, m.chunked_losses, m.reuse_teacher) == \
            (("naive", False, False) if variant == "naive" else (variant, True, True))
        stats[variant] = trainer.run_phase()
        # 8 rollouts / micro-batch 4 = 2 micro-steps per epoch, 2 epochs, one optimizer step each
        assert (trainer.step, trainer.phase, trainer.buffer, trainer.ppo_epoch, trainer.micro_index) == (4, 1, None, 0, 0)
        assert {"time/rollout", "time/score", "time/learn"} <= set(stats[variant])
        finals[variant] = student.state_dict()
        trainer.metrics.close()
    moved = 0.0
    for variant in ("fast", "speculative"):  # at alpha 0 and 1 every engine draws the naive loop's tokens
        assert stats[variant]["rollout/response_length"] == stats["naive"]["rollout/response_length"] == 5.0
        assert stats[variant]["rollout/teacher_logprob"] == pytest.approx(stats["naive"]["rollout/teacher_logprob"],
                                                                          abs=1e-5)
        for name, start in student0.state_dict().items():
            torch.testing.assert_close(finals[variant][name], finals["naive"][name], atol=2e-5, rtol=1e-4)
            moved = max(moved, float((finals["naive"][name] - start).abs().max()))
    assert moved > 1e-4  # the phase did train


def test_speculative_engine_runs_a_phase_with_mixing(models, tmp_path):
    """0 < alpha < 1: drafts are rejected and rows hold holes; the phase still trains on full-length rollouts."""
    student, teacher = models
    setup = PhaseSetup(alpha=0.5, **SETUP)
    prompts, corpus = phase_data(setup)
    trainer = phase_trainer(copy.deepcopy(student), teacher, setup, "speculative", str(tmp_path), prompts, corpus)
    stats = trainer.run_phase()
    assert trainer.step == 4 and trainer.nan_guard.skipped == 0 and stats["rollout/response_length"] == 5.0
    assert torch.isfinite(torch.tensor(stats["rollout/reverse_kl_k3"]))
    trainer.metrics.close()


def test_run_phase_refuses_to_start_inside_a_phase(models, tmp_path):
    student, teacher = models
    setup = PhaseSetup(alpha=0.2, **SETUP)
    prompts, corpus = phase_data(setup)
    trainer = phase_trainer(copy.deepcopy(student), teacher, setup, "fast", str(tmp_path), prompts, corpus)
    trainer.micro_index = 1  # as after resuming mid-phase
    with pytest.raises(RuntimeError, match="phase is in progress"):
        trainer.run_phase()
    trainer.metrics.close()


def test_measure_phases_reports_consistent_numbers_and_restores_the_student(models):
    student, teacher = models
    student = copy.deepcopy(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    setup = PhaseSetup(alpha=0.3, pt_cache_top_k=4, **SETUP)
    result = measure_phases(student, teacher, setup)
    for name, value in student.state_dict().items():
        assert torch.equal(value, before[name])  # each variant started from, and the caller gets back, these
    assert set(result["variants"]) == {"naive", "fast", "fast_pt_cache"}
    for entry in result["variants"].values():
        assert entry["optimizer_steps"] == 4 and entry["nan_skips"] == 0 and entry["mean_response_length"] == 5.0
        parts = entry["rollout_seconds"] + entry["score_seconds"] + entry["learn_seconds"]
        assert 0 < parts <= entry["seconds"]
        assert entry["generated_tokens_per_s"] * entry["seconds"] == pytest.approx(8 * 5)
        zero = {"compiles": 0, "captures": 0, "step_shapes": 0, "compile_seconds": 0.0}  # CPU: eager, no compile
        assert entry["compile"] == {"warmup": zero, "phase": zero}
    naive = result["variants"]["naive"]["seconds"]
    for name, speedup in result["speedup_vs_naive"].items():
        assert speedup == pytest.approx(naive / result["variants"][name]["seconds"])
    build = result["pt_cache_build"]
    # 2 epochs x 2 micro-steps x 4 sequences = 16 chunks; 8 positions each; top-4 int32 ids + fp16 log-probs
    assert build["chunks"] == setup.pt_chunks_per_phase == 16
    assert build["bytes"] >= 16 * 8 * 4 * (4 + 2)
    assert json.loads(json.dumps(result)) == result  # plain JSON values only


def test_cli_phase_only_writes_the_measured_phase(tmp_path):
    path = tmp_path / "phase.json"
    assert bench_main(["--preset", "tiny", "--phase-only", "--batch", "2", "--new-tokens", "4", "--train-batch", "2",
                       "--phase-rollouts", "4", "--ppo-epochs", "1", "--output", str(path)]) == 0
    result = json.loads(path.read_text())
    assert set(result["phases"]) == {"phase_measured"} and result["finite"]
    measured = result["phases"]["phase_measured"]
    assert measured["setup"]["num_rollouts"] == 4 and measured["setup"]["pt_seq_length"] == 16 + 4 + 1
    assert measured["variants"]["fast"]["optimizer_steps"] == 2


def test_setup_errors_are_clear():
    with pytest.raises(ValueError, match="num_rollouts .* multiple of micro_batch"):
        PhaseSetup(num_rollouts=10, micro_batch=4, chunk_size=2)
    with pytest.raises(ValueError, match="ppo_epochs must be >= 1"):
        PhaseSetup(ppo_epochs=0)


def test_kl_target_chunked_needs_a_fraction_of_the_plain_memory():
    """At a shape where the [N, V] logits dominate (8192 positions x 16000 entries, chunks of 1024:
    each chunk's [c, V] tensors are above glibc's 32 MB mmap threshold, so freed chunks leave the resident set), the chunked
    single-step KL computes the same value with well under half the plain version's peak (fresh processes,
    ru_maxrss growth over the step; a first backward's fixed ~0.25 GB of runtime buffers is in both)."""
    from minillm.bench.kl import measure_kl_target

    result = measure_kl_target(batch=16, length=512, vocab=16000, student_hidden=64, teacher_hidden=128,
                               chunk_size=1024, variants=("chunked",))
    plain, chunked = result["plain"], result["chunked"]
    assert chunked["kl"] == pytest.approx(plain["kl"], rel=1e-5)
    assert plain["peak_bytes_above_inputs"] > 8192 * 16000 * 4  # at least one fp32 [N, V] tensor
    assert result["memory_ratio"] == chunked["peak_bytes_above_inputs"] / plain["peak_bytes_above_inputs"] < 0.5
    assert result["speed_ratio"] == pytest.approx(plain["seconds"] / chunked["seconds"])
    assert result["meets_target"] == (result["memory_ratio"] <= 0.25 and result["speed_ratio"] >= 0.8)
