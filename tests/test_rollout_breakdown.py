"""Issue 17 item 6: the fast engine's trace says where a rollout's time goes; its counts are exact.

Oracle: the counts follow from the coins alone (derived here from the returned coin pattern, not from the engine's
code): each model's first turn is a prefill of the prompt and the tokens before it, a turn right after its own
previous one is a one-token step, any later turn a catch-up over the gap; the student catches up to the last token
at the end (the teacher too when scoring); with a stop check at every step, L + 2 host syncs.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_sampling import PAD, left_padded_prompts, tiny_gpt2, tiny_llama

from minillm.generation.engine import fast_mixed_sample
from minillm.generation.trace import RolloutTrace

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

VOCAB = 16


def expected_parts(coins: str, prompt_width: int, score: bool) -> tuple[Counter, Counter]:
    """(count, tokens) per span kind implied by the coin pattern of a call that ran all len(coins) steps."""
    length = len(coins)
    counts, tokens = Counter(), Counter()
    for role, side in (("student", "0"), ("teacher", "1")):
        turns = [t for t, c in enumerate(coins) if c == side]
        if (role == "student" or score) and (not turns or turns[-1] < length - 1):
            turns.append(length - 1)  # the final scoring catch-up
        for i, t in enumerate(turns):
            gap = t - turns[i - 1] if i else None
            kind, n = ("prefill", prompt_width + t) if i == 0 else (("step" if gap == 1 else "catch_up"), gap)
            counts[f"{role}_{kind}"] += 1
            tokens[f"{role}_{kind}"] += n
    counts["sample"], counts["host_sync"] = length, length + 2  # coins, a stop check per step, the final count
    return counts, tokens


@pytest.mark.parametrize("static,score", [(False, False), (True, True)])
def test_trace_counts_follow_from_the_coins(static, score):
    student, teacher = tiny_llama(VOCAB, seed=31), tiny_gpt2(VOCAB, seed=32)
    ids, mask = left_padded_prompts(VOCAB, [3, 5, 2, 4], seed=0)
    trace = RolloutTrace("cpu")
    out = fast_mixed_sample(student, teacher, ids, mask, max_new_tokens=20, alpha=0.4, eos_token_id=None,
                            pad_token_id=PAD, generator=torch.Generator().manual_seed(3), score=score,
                            static_cache=static, cuda_graphs=False, trace=trace)
    coins = "".join("1" if c else "0" for c in out.teacher_steps.tolist())
    assert len(coins) == 20 and "00" in coins and "11" in coins and "101" in coins  # steps and catch-ups both
    parts = trace.summary()
    counts, tokens = expected_parts(coins, 64 if static else ids.shape[1], score)  # static: prompts bucketed to 64
    assert {k: v["count"] for k, v in parts.items()} == dict(counts)
    assert {k: v["tokens"] for k, v in parts.items() if v["tokens"]} == {k: v for k, v in tokens.items() if v}
    forwards = {role: sum(v for k, v in counts.items() if k.startswith(role)) for role in ("student", "teacher")}
    assert (out.student_forwards, out.teacher_forwards) == (forwards["student"], forwards["teacher"])
    assert all(v["seconds"] >= 0 for v in parts.values())
    # an untraced call draws the same tokens: tracing only observes
    plain = fast_mixed_sample(student, teacher, ids, mask, max_new_tokens=20, alpha=0.4, eos_token_id=None,
                              pad_token_id=PAD, generator=torch.Generator().manual_seed(3), score=score,
                              static_cache=static, cuda_graphs=False)
    assert torch.equal(plain.response_ids, out.response_ids)
