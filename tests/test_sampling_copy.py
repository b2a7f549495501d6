"""``strategy.sampling_copy``: rollouts and dev answers decode from a bf16 copy of the fp32 student weights.

Oracles: the copy's parameters are exactly the source's, cast; it computes exactly what the source computes
with its parameters cast to bf16 (buffers untouched); after the source trains, a refresh makes that true again
without moving the copy's storage (CUDA graphs captured on it stay valid); inside the trainer, greedy rollouts
after a phase of training equal greedy decoding of the trained weights cast to bf16 (batch by batch, in the shapes
the trainer decoded them in: bf16 greedy tokens are only reproducible for identical shapes), and differ from the
untrained ones (so a stale copy would fail).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_sampling import tiny_gpt2, tiny_llama

from minillm.config import ConfigError, load_config
from minillm.strategy import HalfPrecisionCopy, build_strategy

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny-model calls: see conftest.py

BF16 = torch.bfloat16


def cast_params(model: torch.nn.Module) -> torch.nn.Module:
    """The oracle: the same module with every parameter cast to bf16 and every buffer left as it is."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.data = p.data.to(BF16)
    return ref.eval()


@pytest.mark.parametrize("build", [lambda: tiny_gpt2(50, seed=0), lambda: tiny_llama(50, seed=0)],
                         ids=["gpt2-tied", "llama-rotary"])
def test_copy_holds_the_cast_weights_and_computes_like_a_cast_model(build):
    source = build().train()
    half = HalfPrecisionCopy(source, BF16)
    copied = half.refresh()
    assert copied is half.module and copied is not source and not copied.training and source.training
    for (name, p), (name_c, c) in zip(source.named_parameters(), copied.named_parameters()):
        assert name == name_c and c.dtype == BF16 and not c.requires_grad and p.dtype == torch.float32
        assert torch.equal(c, p.detach().to(BF16))
    for (name, b), (_, c) in zip(source.named_buffers(), copied.named_buffers()):
        assert c.dtype == b.dtype and torch.equal(c, b), name  # e.g. LLaMA's fp32 rotary frequencies
    if source.config.tie_word_embeddings:
        assert copied.lm_head.weight is copied.transformer.wte.weight
    ids = torch.randint(3, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(copied(ids).logits, cast_params(source)(ids).logits)


def test_refresh_follows_training_in_place():
    source = tiny_llama(50, seed=0)
    half = HalfPrecisionCopy(source, BF16)
    pointers = [p.data_ptr() for p in half.refresh().parameters()]
    ids = torch.randint(3, 50, (4, 9))
    optimizer = torch.optim.SGD(source.parameters(), lr=0.5)
    source(ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in half.module.parameters())  # gradients were never copied
    copied = half.refresh()
    assert [p.data_ptr() for p in copied.parameters()] == pointers
    for p, c in zip(source.parameters(), copied.parameters()):
        assert torch.equal(c, p.detach().to(BF16))


def strategy_for(tmp_path, *overrides):
    cfg = load_config("configs/tiny/minillm.yaml", [f"output_dir={tmp_path}", *overrides], world_size=1)
    return cfg, build_strategy(cfg).setup()


def test_local_strategy_picks_the_copy_only_where_it_helps(tmp_path):
    model = tiny_llama(50, seed=0)
    for overrides in ([], ["student.dtype=bf16"], ["student.dtype=bf16", "strategy.sampling_copy=false"]):
        _, strategy = strategy_for(tmp_path, *overrides)  # fp32, or bf16 on CPU (auto: off off CUDA), or off
        with strategy.sampling_model(model) as m:
            assert m is model
    _, strategy = strategy_for(tmp_path, "student.dtype=bf16", "strategy.sampling_copy=true")
    with strategy.sampling_model(model) as first:
        assert first is not model and next(first.parameters()).dtype == BF16
    with strategy.sampling_model(model) as second:
        assert second is first  # one copy per model, kept: compiled decode steps are reused
    already_half = cast_params(model)
    with strategy.sampling_model(already_half) as m:
        assert m is already_half  # nothing to cast


@pytest.mark.parametrize("overrides", [["strategy.sampling_copy=true"],
                                       ["strategy.sampling_copy=true", "student.dtype=bf16",
                                        "strategy.backend=deepspeed"]])
def test_config_refuses_a_copy_that_cannot_apply(tmp_path, overrides):
    with pytest.raises(ConfigError, match="strategy.sampling_copy"):
        strategy_for(tmp_path, *overrides)


def test_trainer_rollouts_decode_the_current_weights_cast(tmp_path):
    from minillm.cli.train import build_trainer
    from minillm.generation.rollout import pad_responses

    cfg, strategy = strategy_for(tmp_path, "student.dtype=bf16", "strategy.sampling_copy=true",
                                 "rollout.do_sample=false", "rollout.teacher_mix_alpha=0", "train.eval_interval=0",
                                 "train.save_interval=0")
    trainer = build_trainer(cfg, strategy)
    untrained = cast_params(trainer.student)
    trainer.run_phase()
    buffer = trainer.rollout_and_score()
    assert all(p.dtype == torch.float32 for p in trainer.student.parameters())

    def greedy(model, prompt_ids, prompt_mask):
        r = cfg.rollout
        with torch.no_grad(), strategy.autocast():
            out = trainer._sample(model, None, prompt_ids, prompt_mask, max_new_tokens=r.max_new_tokens,
                                  alpha=0.0, temperature=1.0, top_k=0, top_p=1.0,
                                  eos_token_id=trainer.tokenizer.eos_token_id,
                                  pad_token_id=trainer.tokenizer.pad_token_id,
                                  generator=torch.Generator().manual_seed(0), do_sample=False)
        return pad_responses(out.response_ids, out.response_mask, r.max_new_tokens, trainer.tokenizer.pad_token_id)[0]

    # Decode each generation batch exactly as the trainer did: the same rows, left-padded to the same width. The
    # buffer re-pads every batch's prompts to the widest one, and bf16 greedy decoding is only reproducible for
    # identical shapes: padding changes the matmul shapes, so the bf16 rounding, so a near-tie can flip a token
    # and the row diverges from there. Same shapes and weights, same kernels: the tokens must be equal exactly.
    chunk = cfg.rollout.chunk_size
    assert len(buffer) == 2 * chunk  # two generation batches, of different prompt widths
    widths, stale = [], []
    for start in range(0, len(buffer), chunk):
        rows = slice(start, start + chunk)
        mask = buffer.prompt_mask[rows]
        width = int(mask.sum(-1).max())  # the batch was left-padded to its longest prompt, as the collator pads
        widths.append(width)
        ids, mask = buffer.prompt_ids[rows, -width:], mask[:, -width:]
        assert torch.equal(buffer.prompt_mask[rows, :-width], torch.zeros_like(buffer.prompt_mask[rows, :-width]))
        assert torch.equal(buffer.response_ids[rows], greedy(cast_params(trainer.student), ids, mask))
        stale.append(torch.equal(buffer.response_ids[rows], greedy(untrained, ids, mask)))
    assert not all(stale)  # the phase moved the weights: a stale copy would decode the untrained ones
    assert widths[0] != widths[1]  # so the buffer's common width really differs from one batch's own
    trainer.metrics.close()


def test_compiled_decode_steps_follow_the_refreshed_weights_without_recompiling():
    """The compiled step (torch.compile, the CUDA-graph path on GPUs) is built once per copy; a refresh changes the
    weights in place, and the next rollout must decode the new weights, not constants captured at compile time.
    (fp32 copy here, so compiled and eager rollouts are comparable token for token.)"""
    import torch._dynamo
    from test_engine import PAD, left_padded_prompts

    from minillm.generation.engine import fast_mixed_sample

    torch._dynamo.reset()
    source, teacher = tiny_llama(32, seed=1), tiny_llama(32, seed=2)
    half = HalfPrecisionCopy(source, torch.float32)
    ids, mask = left_padded_prompts(32, [3, 5, 1], seed=0)

    def rollout(model, compiled: bool):
        return fast_mixed_sample(model, teacher, ids, mask, max_new_tokens=8, alpha=0.3, eos_token_id=None,
                                 pad_token_id=PAD, generator=torch.Generator().manual_seed(0), static_cache=True,
                                 cuda_graphs=compiled).response_ids

    before = rollout(half.refresh(), True)
    with torch.no_grad():  # a training step's worth of change, in place
        for p in source.parameters():
            p.add_(torch.randn_like(p), alpha=0.5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        after = rollout(half.refresh(), True)
    assert torch.equal(after, rollout(copy.deepcopy(source), False))
    assert not torch.equal(after, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_steps_on_a_bf16_copy_follow_refreshes():
    """On CUDA the copy's decode steps are CUDA graphs: replays must read the refreshed weights (same storage).

    Not compared token for token with an *eager* bf16 rollout: compiled bf16 kernels round differently from eager
    ones (inductor fuses ops and keeps fp32 intermediates), so after a near-tie a sampled token can differ and the
    row diverges from there (seen on an H200: one row, last 2 of 24 positions). Oracles that a stale replay fails:
    a fresh bf16 cast of the trained weights, compiled and replayed the same way, draws the same tokens (same kernels,
    same numbers); and the log-probs the refreshed copy reports are, to bf16 rounding, those of the trained weights
    (teacher-forced, eager), an order of magnitude closer to them than to the old weights'."""
    from test_engine import PAD, left_padded_prompts

    from minillm.generation.engine import fast_mixed_sample
    from minillm.generation.sampling import teacher_forced_logprobs

    source = tiny_llama(64, seed=1).cuda()
    teacher = tiny_llama(64, seed=2).cuda().to(BF16)
    half = HalfPrecisionCopy(source, BF16)
    ids, mask = (x.cuda() for x in left_padded_prompts(64, [3, 9, 1, 6], seed=0))

    def rollout(model, graphs: bool):
        return fast_mixed_sample(model, teacher, ids, mask, max_new_tokens=24, alpha=0.3, eos_token_id=None,
                                 pad_token_id=PAD, generator=torch.Generator("cuda").manual_seed(0),
                                 static_cache=True, cuda_graphs=graphs)

    old = cast_params(source)
    before = rollout(half.refresh(), True).response_ids
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p), alpha=0.5)
    after = rollout(half.refresh(), True)
    assert not torch.equal(after.response_ids, before)
    assert torch.equal(after.response_ids, rollout(cast_params(source), True).response_ids)
    new = cast_params(source)
    forced = {name: teacher_forced_logprobs(model, ids, mask, after.response_ids, after.response_mask)
              for name, model in (("new", new), ("old", old))}
    error = {name: (after.student_logprobs - lp).abs().mean().item() for name, lp in forced.items()}
    assert error["new"] < 0.1 * error["old"], error
