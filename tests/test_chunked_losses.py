"""The trainers' chunked vocabulary-wide losses (``minillm.losses.chunked``, ``kd.chunked``) equal the plain ones.

Through the real code paths: ``MiniLLMTrainer.micro_batch_loss`` (PPO term, single-step KL, PT loss with its KD
half), ``score_samples`` (teacher and old-student log-probs) and ``SFTTrainer.compute_loss`` (CE + KD at a
temperature, several divergences): same loss values and the same student gradients to fp32 rounding. Both
models get 8 padded output rows beyond the 512-token tokenizer, so the vocabulary trim must apply in the
chunked heads too, and small chunk sizes make every loss run over several chunks.
"""

from __future__ import annotations

import pytest
import torch

from minillm.config import load_config
from minillm.generation.rollout import score_samples
from minillm.strategy import build_strategy

REPO_CONFIGS = "configs/tiny"
PADDED_ROWS = 520  # tokenizer: 512 tokens


def build(method: str, tmp_path, overrides: list[str], padded: bool = True):
    from minillm.data import build_instruction_data
    from minillm.models import check_compatibility, load_model, load_tokenizer

    cfg = load_config(f"{REPO_CONFIGS}/{method}.yaml", [f"output_dir={tmp_path}", "logging.progress_bar=false",
                                                         *overrides])
    strategy = build_strategy(cfg).setup()
    cfg.resolve(strategy.world_size)
    tokenizer = load_tokenizer(cfg.student)
    data = build_instruction_data(cfg.data, tokenizer, seed=cfg.seed)
    torch.manual_seed(0)
    student = load_model(cfg.student, trainable=True)
    teacher = load_model(cfg.teacher, trainable=False)
    for model in (student, teacher) if padded else ():
        model.resize_token_embeddings(PADDED_ROWS, mean_resizing=False)
        with torch.no_grad():  # large logits on the padded rows: forgetting the trim would change every loss
            model.get_output_embeddings().weight[512:].normal_(0.0, 2.0)
    alignment = check_compatibility(student, teacher, tokenizer)
    assert alignment.vocab_size == 512 and alignment.student_rows == (PADDED_ROWS if padded else 512)
    if method == "minillm":
        from minillm.trainers.minillm import MiniLLMTrainer

        return MiniLLMTrainer(cfg, student, tokenizer, data, strategy, teacher=teacher, alignment=alignment)
    from minillm.trainers.sft import SFTTrainer

    return SFTTrainer(cfg, student, tokenizer, data, strategy, teacher=teacher, alignment=alignment)


def loss_and_grads(trainer, compute):
    trainer.student.zero_grad(set_to_none=True)
    loss, parts = compute()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.student.named_parameters() if p.grad is not None}
    return loss.detach(), parts, grads


def assert_same(plain, chunked):
    (loss_a, parts_a, grads_a), (loss_b, parts_b, grads_b) = plain, chunked
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    assert parts_a.keys() == parts_b.keys()
    for key in parts_a:
        assert parts_b[key] == pytest.approx(parts_a[key], rel=1e-4, abs=1e-5), key
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4, msg=name)


def test_minillm_micro_batch_loss_chunked_equals_plain(tmp_path):
    extra = ["minillm.single_step_weighted=true", "rollout.temperature=1.5"]  # weights and T reach every term
    trainer = build("minillm", tmp_path, ["minillm.loss_chunk_size=37", "minillm.chunked_losses=false",
                                          "rollout.num_rollouts=16", "train.global_batch_size=8", *extra])
    assert trainer.use_pt and trainer.cfg.minillm.pt_kd_ratio > 0
    buffer = trainer.rollout_and_score()  # plain scoring
    mb = buffer.select(torch.arange(8))
    pt_batch = trainer._next_pt_batch()
    trainer._next_pt_batch = lambda: pt_batch  # the same corpus batch for both paths
    m = trainer.cfg.minillm
    assert mb.response_mask.sum() > 2 * m.loss_chunk_size  # several chunks
    plain = loss_and_grads(trainer, lambda: trainer.micro_batch_loss(mb))
    m.chunked_losses = True
    chunked = loss_and_grads(trainer, lambda: trainer.micro_batch_loss(mb))
    assert_same(plain, chunked)
    assert {"pg_loss", "single_step_kl", "pt_loss"} <= chunked[1].keys()

    # scoring: the same rollout scored both ways
    r = trainer.cfg.rollout
    common = dict(student=trainer.student, teacher=trainer.teacher, prompt_ids=mb.prompt_ids,
                  prompt_mask=mb.prompt_mask, response_ids=mb.response_ids, response_mask=mb.response_mask,
                  prompt_index=mb.prompt_index, alpha=r.teacher_mix_alpha, temperature=r.temperature,
                  reward_scale=m.reward_scale, reward_clip=m.reward_clip, gamma=m.gamma, length_norm=m.length_norm,
                  include_current=m.include_current, trim=trainer._trim)
    a = score_samples(**common)
    b = score_samples(**common, chunk_size=m.loss_chunk_size)
    for name in ("old_logprobs", "teacher_logprobs", "weights", "rewards", "returns"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(a.old_logprobs, mb.old_logprobs)  # the buffer was scored the plain way


@pytest.mark.parametrize("divergence,temperature", [("fkl", 1.0), ("fkl", 2.0), ("jsd", 1.5), ("rkl", 1.0)])
def test_sft_kd_compute_loss_chunked_equals_plain(tmp_path, divergence, temperature):
    trainer = build("kd", tmp_path, ["kd.chunked=false", "kd.chunk_size=7", f"kd.divergence={divergence}",
                                     f"kd.temperature={temperature}"])
    batch = next(trainer._micro_batches())
    assert int((batch["labels"] != -100).sum()) > 2 * 7
    plain = loss_and_grads(trainer, lambda: trainer.compute_loss(batch))
    trainer.cfg.kd.chunked = True
    chunked = loss_and_grads(trainer, lambda: trainer.compute_loss(batch))
    assert_same(plain, chunked)
    assert chunked[1]["kd"] != 0.0


def test_teacher_hidden_kept_from_scoring_replaces_the_teacher_forward(tmp_path):
    """minillm.reuse_teacher: the single-step term of every PPO epoch uses the teacher's hidden states kept at
    scoring (only its LM head runs): same loss and gradients as re-running the teacher, and no teacher forward."""
    trainer = build("minillm", tmp_path, ["minillm.loss_chunk_size=37", "minillm.ptx_coef=0",
                                          "rollout.num_rollouts=16", "train.global_batch_size=8"])
    buffer = trainer.rollout_and_score()
    assert buffer.has_teacher_hidden
    assert buffer.teacher_hidden.shape == (*buffer.response_ids.shape, trainer.teacher.config.hidden_size)
    mb = buffer.select(torch.arange(8))
    calls = []
    hook = trainer.teacher.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    reused = loss_and_grads(trainer, lambda: trainer.micro_batch_loss(mb))
    assert calls == []  # the teacher's body never ran; its head did, through the kept hidden states
    rerun_mb = type(mb).from_state_dict({k: v for k, v in mb.state_dict().items() if k != "teacher_hidden"})
    assert not rerun_mb.has_teacher_hidden  # checkpoints written before the field existed load this way
    rerun = loss_and_grads(trainer, lambda: trainer.micro_batch_loss(rerun_mb))
    assert len(calls) == 1
    hook.remove()
    assert_same(rerun, reused)
    assert reused[1]["single_step_kl"] > 0
    restored = type(buffer).from_state_dict(buffer.state_dict())  # the buffer checkpoint keeps the hidden states
    assert torch.equal(restored.teacher_hidden, buffer.teacher_hidden)
