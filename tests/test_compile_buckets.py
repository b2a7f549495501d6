"""Issue 17 item 3: decode shapes are bucketed so a training run compiles its decode steps in its first phase only.

Oracles: the engine with bucketing off (exact (batch, prompt + new tokens) static shapes), bit for bit; and the
trainer's own metrics.jsonl counts, whose expected values follow from the shapes the run decodes.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_engine import assert_logprobs_close
from test_sampling import PAD, left_padded_prompts, tiny_llama

from conftest import REPO
from minillm.generation import engine
from minillm.generation.engine import fast_mixed_sample

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

VOCAB = 32


def forced(*args, **kwargs):
    """fast_mixed_sample on the CUDA path (static caches, compiled steps, sparse stop checks), whatever the caller
    asked for: how the trainer and dev evaluation are put on that path on CPU."""
    return fast_mixed_sample(*args, **{**kwargs, "static_cache": True, "cuda_graphs": True})


def test_bucketed_batches_give_the_unbucketed_results_bit_for_bit(monkeypatch):
    """A full batch of 8 rows, then a last batch of 5 rows and a narrower prompt, then 6 rows of the student alone:
    bucketed, all decode at the 8-row shape (dummy rows) and a cache of 128 columns. The real rows' tokens,
    log-probs and the random stream after the call are bit for bit those of decoding the rows alone at the same
    cache length (eager static path); against no bucketing at all (76 columns) the tokens and stream are equal and
    the log-probs equal to fp32 rounding (attention sums over more, masked, slots)."""
    student, teacher = tiny_llama(VOCAB, seed=11), tiny_llama(VOCAB, seed=12)
    keys = []
    original = engine._static_cache
    monkeypatch.setattr(engine, "_static_cache", lambda model, key: keys.append(key) or original(model, key))
    bucketed_shape = engine._static_shape
    batches = [([3, 5, 1, 4, 2, 6, 2, 3], 0.4, 0), ([2, 9, 4, 4, 1], 0.4, 1), ([7, 3, 2, 5, 5, 1], 0.0, 2)]
    variants = {"bucketed": bucketed_shape, "rows_alone": lambda model, rows, needed: (rows, 128),
                "off": lambda model, rows, needed: (rows, needed)}
    for lengths, alpha, seed in batches:
        ids, mask = left_padded_prompts(VOCAB, lengths, seed=seed)
        runs = {}
        for name, shape in variants.items():
            monkeypatch.setattr(engine, "_static_shape", shape)
            keys.clear()
            generator = torch.Generator().manual_seed(seed)
            out = fast_mixed_sample(student, teacher if alpha else None, ids, mask, max_new_tokens=12, alpha=alpha,
                                    eos_token_id=[2, 3], pad_token_id=PAD, generator=generator, static_cache=True,
                                    cuda_graphs=False)
            runs[name] = (out, float(torch.rand(1, generator=generator)), {k[1:] for k in keys})
        rows = len(lengths)
        assert runs["bucketed"][2] == {(8, 128)}  # 8 rows; prompt bucket 64 + 12 new tokens, rounded up to 128
        assert runs["rows_alone"][2] == {(rows, 128)} and runs["off"][2] == {(rows, 64 + 12)}
        bucketed, reference, off = runs["bucketed"][0], runs["rows_alone"][0], runs["off"][0]
        assert runs["bucketed"][1] == runs["rows_alone"][1] == runs["off"][1]
        assert bucketed.response_ids.shape[0] == rows
        for name in ("response_ids", "response_mask", "student_logprobs", "teacher_logprobs", "mixed_logprobs",
                     "teacher_steps"):
            a, b = getattr(bucketed, name), getattr(reference, name)
            assert (a is None and b is None) or torch.equal(a, b), name
        assert torch.equal(bucketed.response_ids, off.response_ids)
        assert_logprobs_close(bucketed.mixed_logprobs, off.mixed_logprobs)


def test_a_training_run_compiles_and_captures_in_its_first_phase_only(tmp_path, monkeypatch, counting_compile):
    """Three MiniLLM phases on the CUDA path forced on CPU: each phase a batch of 16 prompts then a last batch of 8,
    prompt widths varying per batch, a dev evaluation (12 prompts, 20 new tokens instead of 24) after each phase.
    Every one of those decodes at the 16-row shape, so the student's and teacher's steps compile once (2 step
    shapes) in phase 1; metrics.jsonl then shows flat engine/compiles and engine/step_shapes and time/compile 0.
    (Without bucketing the dev batch is a new shape first seen after phase 1: the count grows at step 6.)
    Real dynamo with a counting pass-through backend instead of inductor, so compiles are quick."""
    import torch._dynamo

    from minillm.cli.train import build_trainer
    from minillm.config import load_config
    from minillm.strategy import build_strategy

    graphs = counting_compile
    monkeypatch.setattr("minillm.generation.dispatch.fast_mixed_sample", forced)
    monkeypatch.setattr(engine, "fast_mixed_sample", forced)  # dev evaluation imports it from the engine module
    torch._dynamo.reset()
    cfg = load_config(str(REPO / "configs/tiny/minillm.yaml"), [
        f"output_dir={tmp_path}", "rollout.num_rollouts=24", "rollout.chunk_size=16", "train.global_batch_size=8",
        "train.micro_batch_size=8", "minillm.ppo_epochs=1", "train.max_steps=9", "train.eval_interval=3",
        "train.save_interval=100", "logging.log_interval=3", "eval.engine=fast", "eval.num_prompts=12",
        "eval.batch_size=16", "eval.max_new_tokens=20", "data.max_prompt_length=48"])
    strategy = build_strategy(cfg).setup()
    cfg.resolve(strategy.world_size)
    trainer = build_trainer(cfg, strategy)
    trainer.train()
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
            if "engine/compiles" in r}
    assert sorted(rows) == [3, 6, 9]
    first, later = rows[3], [rows[6], rows[9]]
    assert first["engine/step_shapes"] == 2  # student and teacher, each at (16 rows, 128 columns: 64 + 24 rounded up)
    assert first["engine/compiles"] >= 2 and first["time/compile"] > 0
    for row in later:
        assert row["engine/compiles"] == first["engine/compiles"]
        assert row["engine/step_shapes"] == first["engine/step_shapes"]
        assert row["engine/captures"] == first["engine/captures"] == 0  # CPU: no CUDA graphs
        assert row["time/compile"] == 0.0
    assert len(graphs) == first["engine/compiles"]  # the hook counted what dynamo handed the backend
    for model in (trainer.student, trainer.teacher):
        assert engine._decode_step(model).shapes == {(16, 128)}


def test_the_compile_hook_counts_graph_recordings_by_the_trigger_torch_sends(monkeypatch):
    """CUDA graphs cannot be recorded on CPU: feed the hook the event inductor's CUDA-graph trees send when they
    record (this torch's own enum), and an unknown trigger, which must be ignored without raising."""
    from types import SimpleNamespace

    from torch._dynamo.callback import CallbackArgs, CallbackTrigger

    from minillm.generation import compile_stats

    monkeypatch.setattr(compile_stats, "STATS", compile_stats.CompileStats())
    compile_stats._on_start(CallbackArgs(CallbackTrigger.CUDAGRAPH_RECORDING, "0/0"))
    compile_stats._on_start(CallbackArgs(CallbackTrigger.DYNAMO, "0/1"))
    compile_stats._on_start(SimpleNamespace(callback_trigger="something new"))
    assert (compile_stats.STATS.captures, compile_stats.STATS.compiles) == (1, 1)


def test_compiles_are_still_counted_after_a_dynamo_reset():
    """torch._dynamo.reset() clears dynamo's callbacks; a compile after it (a user's reset between two runs, or a
    test's) must still be counted. Before the fix the counter, installed once, silently stayed at 0."""
    import torch._dynamo

    from minillm.generation import compile_stats

    compile_stats.install()
    torch._dynamo.reset()
    log = compile_stats.CompileLog()
    torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))
    assert log.pop()["engine/compiles"] == 1
