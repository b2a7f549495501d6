"""The engine's CUDA-only branches, forced on CPU: static caches, compiled decode steps (torch.compile "reduce-overhead";
CUDA graphs on a GPU, plain inductor here), stop checks every 16 steps, the run-time fallbacks, and the exit of a
failed run that compiled.

Oracle: the plain eager dynamic-cache path with a stop check at every step, under the same generator: token for
token, log-prob for log-prob, same number of columns. Recompiles are counted on the engine's per-model step.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_engine import assert_logprobs_close
from test_sampling import PAD, left_padded_prompts, tiny_gpt2, tiny_llama

from conftest import REPO
from minillm.generation import engine
from minillm.generation.engine import fast_mixed_sample

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

VOCAB = 32
STOPS = list(range(2, 14))  # many stop ids: rows end after a few tokens, so every batch stops early
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def compiled_models():
    """One student and one teacher for every compiled case: compiling on CPU is slow, shapes are shared."""
    import torch._dynamo

    torch._dynamo.reset()
    return tiny_llama(VOCAB, seed=1), tiny_llama(VOCAB, seed=2)


def run(student, teacher, ids, mask, seed, *, forced: bool, alpha: float, max_new_tokens: int = NEW_TOKENS):
    """One rollout; ``out.next_draw`` is the generator's next uniform after it (where the call left the stream)."""
    generator = torch.Generator().manual_seed(seed)
    out = fast_mixed_sample(student, teacher if alpha else None, ids, mask, max_new_tokens=max_new_tokens,
                            alpha=alpha, eos_token_id=STOPS, pad_token_id=PAD, generator=generator,
                            static_cache=forced, cuda_graphs=forced)
    out.next_draw = float(torch.rand(1, generator=generator))
    return out


def assert_same_rollout(fast, plain, alpha):
    assert fast.next_draw == plain.next_draw  # the random stream is left where a stop check at every step leaves it
    assert torch.equal(fast.response_ids, plain.response_ids)
    assert torch.equal(fast.response_mask, plain.response_mask)
    assert torch.equal(fast.teacher_steps, plain.teacher_steps)
    assert_logprobs_close(fast.student_logprobs, plain.student_logprobs)
    assert_logprobs_close(fast.mixed_logprobs, plain.mixed_logprobs)
    if alpha:
        assert_logprobs_close(fast.teacher_logprobs, plain.teacher_logprobs)


# --------------------------------------------------------------------------------------------- the harness
CASES = [  # (prompt lengths: batch size and width, alpha, seed); the first two share one bucketed shape
    ([3, 5, 1], 0.3, 0),
    ([7, 2, 4], 0.3, 1),
    ([6, 2], 0.0, 2),
    ([2, 9], 0.5, 3),
]


def test_compiled_static_sparse_stop_path_equals_the_eager_dense_path(compiled_models):
    """Every batch stops early (all rows hit a stop id before max_new_tokens), so the sparse stop check decodes past
    the last kept column; the result must still be the dense path's, trimmed to the same width. Batches of several
    sizes and prompt widths, the student alone (α = 0) and teacher-mixed. A second batch of an already compiled
    (bucketed) shape compiles nothing new."""
    import torch._dynamo

    student, teacher = compiled_models
    widths, mixed = [], []
    for i, (lengths, alpha, seed) in enumerate(CASES):
        ids, mask = left_padded_prompts(VOCAB, lengths, seed=seed)
        plain = run(student, teacher, ids, mask, seed, forced=False, alpha=alpha)
        if i == 1:  # same batch size and bucket as case 0: nothing may recompile
            with torch._dynamo.config.patch(error_on_recompile=True):
                fast = run(student, teacher, ids, mask, seed, forced=True, alpha=alpha)
        else:
            fast = run(student, teacher, ids, mask, seed, forced=True, alpha=alpha)
        assert_same_rollout(fast, plain, alpha)
        widths.append(fast.response_ids.shape[1])
        mixed.append(0 < int(fast.teacher_steps.sum()) < len(fast.teacher_steps))
    assert any(mixed)  # some batch drew from both models (lazy catch-ups on both sides)
    assert max(widths) < NEW_TOKENS, widths  # every batch stopped early: the sparse check ran past its stop
    # two batch sizes → the student's step compiled at most one graph per shape (plus dynamo's automatic-dynamic
    # recompile), far from the recompile limit; the teacher has its own step and its own count
    for model in (student, teacher):
        step = engine._decode_step(model)
        assert step.compiled_entries() <= len(step.shapes) <= 2, (step.compiled_entries(), step.shapes)
    assert engine._decode_step(student).code is not engine._decode_step(teacher).code


def test_eval_fast_generation_forced_onto_the_cuda_path_equals_the_eager_path(compiled_models, monkeypatch):
    """``minillm.evaluation.generation``'s fast engine (dev answers, minillm-eval, minillm-generate) goes through
    fast_mixed_sample; forced onto static caches + compiled steps + sparse stop checks it answers the same."""
    from minillm.evaluation.generation import generate_batches

    student, _ = compiled_models  # several batches: a shifted random stream would change the later ones

    class Tokenizer:  # what generation reads from a tokenizer
        pad_token_id, eos_token_id = PAD, STOPS

        def __len__(self):
            return VOCAB

        def batch_decode(self, rows, skip_special_tokens=True):
            return [" ".join(map(str, r.tolist())) for r in rows]

    batches = [dict(zip(("input_ids", "attention_mask"), left_padded_prompts(VOCAB, lengths, seed=seed)))
               for lengths, _, seed in CASES]
    kwargs = dict(max_new_tokens=NEW_TOKENS, seed=4, engine="fast")
    plain = generate_batches(student, Tokenizer(), batches, **kwargs)
    monkeypatch.setattr(engine, "fast_mixed_sample",
                        functools.partial(fast_mixed_sample, static_cache=True, cuda_graphs=True))
    forced = generate_batches(student, Tokenizer(), batches, **kwargs)
    for a, b in zip(forced, plain):
        assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
        assert a.response_ids.shape[1] < NEW_TOKENS


def test_static_caches_are_reused_per_model_role_and_shape():
    """The same StaticCache object (same tensor addresses: CUDA-graph trees do not re-record) for every call of one
    (model, role, batch, length); reset between calls, so results repeat; student and teacher roles apart."""
    model = tiny_gpt2(VOCAB, seed=0)
    ids, mask = left_padded_prompts(VOCAB, [3, 5], seed=0)
    seen = []
    original = engine._static_cache

    def spy(m, key):
        cache = original(m, key)
        seen.append((key, cache))
        return cache

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "_static_cache", spy)
        first = fast_mixed_sample(model, model, ids, mask, max_new_tokens=6, alpha=0.5, eos_token_id=None,
                                  pad_token_id=PAD, generator=torch.Generator().manual_seed(0), static_cache=True)
        pointers = [layer.keys.data_ptr() for _, c in seen for layer in c.layers]
        second = fast_mixed_sample(model, model, ids, mask, max_new_tokens=6, alpha=0.5, eos_token_id=None,
                                   pad_token_id=PAD, generator=torch.Generator().manual_seed(0), static_cache=True)
    (k0, c0), (k1, c1), (k2, c2), (k3, c3) = seen
    assert k0[0] == 0 and k1[0] == 1 and c0 is not c1  # one model as student and teacher: two caches
    assert (k2, k3) == (k0, k1) and c2 is c0 and c3 is c1
    assert [layer.keys.data_ptr() for c in (c2, c3) for layer in c.layers] == pointers
    assert torch.equal(first.response_ids, second.response_ids)
    assert_logprobs_close(second.teacher_logprobs, first.teacher_logprobs)


# --------------------------------------------------------------------------------------------- run-time fallbacks
def eager_reference(student, teacher, seed=0):
    ids, mask = left_padded_prompts(VOCAB, [3, 5, 2], seed=seed)
    return ids, mask, run(student, teacher, ids, mask, seed, forced=False, alpha=0.4, max_new_tokens=8)


def warnings_about(caplog, switch: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "minillm.generation.engine" and switch in r.getMessage()]


def test_a_compiled_step_that_fails_part_way_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    """The "compiled" step runs the model (writing the static cache) and then raises on its third call, as a capture
    failing mid-step would: the engine rewinds the cache, warns once naming rollout.cuda_graphs, and decodes the
    rest eagerly with the same result; later batches use eager directly (no second warning)."""
    student, teacher = tiny_llama(VOCAB, seed=3), tiny_llama(VOCAB, seed=4)
    calls = []

    def fake_compile(function, **config):
        def step(*args, **kwargs):
            calls.append(1)
            out = function(*args, **kwargs)
            if len(calls) == 3:
                raise RuntimeError("cudagraph capture failed (planted)")
            return out
        return step

    monkeypatch.setattr(torch, "compile", fake_compile)
    ids, mask, plain = eager_reference(student, teacher)
    with caplog.at_level(logging.WARNING, logger="minillm.generation.engine"):
        for _ in range(2):
            fast = run(student, teacher, ids, mask, 0, forced=True, alpha=0.4, max_new_tokens=8)
            assert_same_rollout(fast, plain, 0.4)
    assert len(calls) >= 3 and (engine._decode_step(student).broken or engine._decode_step(teacher).broken)
    assert len(warnings_about(caplog, "rollout.cuda_graphs")) == 1


def test_a_failing_static_cache_falls_back_to_the_dynamic_cache_with_one_warning(monkeypatch, caplog):
    import transformers

    def broken(*args, **kwargs):
        raise RuntimeError("no static cache for this model (planted)")

    monkeypatch.setattr(transformers, "StaticCache", broken)
    student, teacher = tiny_llama(VOCAB, seed=5), tiny_gpt2(VOCAB, seed=6, head_std=0.5)
    ids, mask, plain = eager_reference(student, teacher, seed=1)
    with caplog.at_level(logging.WARNING, logger="minillm.generation.engine"):
        for _ in range(2):
            fast = run(student, teacher, ids, mask, 1, forced=True, alpha=0.4, max_new_tokens=8)
            assert_same_rollout(fast, plain, 0.4)
    assert len(warnings_about(caplog, "rollout.static_cache")) == 2  # one per model type, not one per batch


def test_past_the_recompile_limit_new_shapes_decode_eagerly_with_one_warning(monkeypatch, caplog, counting_compile):
    """Dynamo past its recompile limit would run the step eagerly without a word; the engine makes it raise, switches
    that shape to eager explicitly (same results), logs it once, and keeps the compiled step for the shapes it holds.
    Real dynamo, with a counting pass-through backend instead of inductor (fast on CPU)."""
    import torch._dynamo

    compiles = counting_compile
    student = tiny_llama(VOCAB, seed=7)
    # config.patch, not monkeypatch: the config module's attributes do not survive monkeypatch's undo
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level(logging.WARNING, logger="minillm.generation.engine"):
        for lengths in ([3, 5], [2, 4, 1], [1, 6, 2], [4, 4]):  # batch sizes 2, 3, 3, 2
            ids, mask = left_padded_prompts(VOCAB, lengths, seed=0)
            plain = run(student, None, ids, mask, 0, forced=False, alpha=0.0)
            assert_same_rollout(run(student, None, ids, mask, 0, forced=True, alpha=0.0), plain, 0.0)
    step = engine._decode_step(student)
    assert len(compiles) == 1 and step.compiled_entries() == 1  # batch size 2 only; its second batch reused it
    assert {shape[0] for shape in step.eager_shapes} == {4}  # batch 3 runs at its bucket, 4 rows
    assert len(warnings_about(caplog, "recompile_limit")) == 1


# --------------------------------------------------------------------------------------------- failed runs exit
PLANTED = textwrap.dedent("""
    import sys, time
    import torch
    sys.path.insert(0, "tests")
    from test_sampling import PAD, left_padded_prompts, tiny_llama
    from minillm.generation.engine import fast_mixed_sample
    from minillm.runtime import run_main

    def main():
        model = tiny_llama(16, seed=0)
        ids, mask = left_padded_prompts(16, [2, 3], seed=0)
        fast_mixed_sample(model, None, ids, mask, max_new_tokens=3, alpha=0.0, eos_token_id=None, pad_token_id=PAD,
                          static_cache=True, cuda_graphs=True)
        from torch._inductor.async_compile import AsyncCompile
        # compile work still in flight in inductor's pool when the run fails (first Triton compiles on a GPU)
        AsyncCompile.pool().submit(time.sleep, 600)
        print("FAILING AT", time.time(), flush=True)
        raise RuntimeError("planted failure after a compiled decode")

    run_main(main)
""")


def test_a_run_that_fails_after_compiling_exits_promptly_with_its_error():
    """Without ``minillm.runtime.run_main`` this process would wait for the pending compile work at exit (600 s
    here; measured: the unprotected script lives on for the whole sleep after printing its traceback)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCHINDUCTOR_COMPILE_THREADS": "2"}  # a pool even on 1 core
    done = subprocess.run([sys.executable, "-c", PLANTED], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=400)
    ended = time.time()
    assert done.returncode == 1, done.stderr[-2000:]
    assert "RuntimeError: planted failure after a compiled decode" in done.stderr
    failed_at = float(done.stdout.split("FAILING AT")[1].split()[0])
    assert ended - failed_at < 20, ended - failed_at
