"""The exactness oracle of tests/test_exactness.py run through the MiniLLM trainer's own code (issue 16, item 1).

tests/test_exactness.py shows that the paper-mode update, assembled there from ``minillm.losses``, is the exact
gradient of the sequence-level reverse KL. That says nothing about how the trainer wires those functions together
(which log-prob goes where in the reward, which returns reach the PPO term, ...). Here the same identity is checked
on ``MiniLLMTrainer.rollout_and_score`` (which calls ``score_samples`` with the trainer's own settings) and
``MiniLLMTrainer.micro_batch_loss``, plain and chunked:

* the student and the teacher are tabular language models (:class:`TabularLM`): the logits predicting y_t are one
  row of a table indexed by the prefix y_<t, produced as a one-hot hidden state times an LM head, so both the plain
  path (``model(...).logits``) and the chunked path (hidden states + ``get_output_embeddings()``) read them;
* the rollout buffer is *enumerated*: ``rollout_and_score`` runs as in training, except that the sampler returns
  every complete sequence of the tiny vocabulary once (each after a one-token prompt that the models ignore);
* the expectation is made exact by weighting instead of sampling. With α = 0 the trainer samples from q_θ itself,
  so its update is an average of per-sequence gradients with y ~ q_θ. ``micro_batch_loss`` returns a token *mean*
  over its micro-batch; with one sequence per micro-batch, n(y) · loss(y) is that sequence's per-token *sum* S(y),
  which is what the policy-gradient identity is about. So Σ_y q_θ(y) · n(y) · ∇ loss(y), with q_θ(y) a constant
  computed by the test, is the exact expected update: no Monte-Carlo error, nothing left to chance;
* the exact side is ∇_θ KL(q_θ‖p) by autograd over the enumeration in float64 (``exact_kl_gradient``).

Paper mode (include_current=false, γ = 1, no length normalisation, no whitening, α = 0, T = 1, reward scale 1, no
PT term): the two agree up to the float32 the trainer computes its logits in. A wiring bug such as the reward's
arguments swapped (log q − log p) flips the long-range half and the gradients then differ by O(1).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from minillm import losses as L
from minillm.config import load_config
from minillm.data import build_instruction_data
from minillm.models import load_tokenizer
from minillm.strategy import build_strategy
from minillm.trainers.minillm import MiniLLMTrainer

from test_exactness import Tables, exact_kl_gradient

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT_LENGTH = 1  # one token the tabular models ignore: position 0 predicts y_0 from the empty prefix


class TabularLM(torch.nn.Module):
    """A causal LM whose logits at the position predicting y_t are ``table[row(y_<t)]``.

    The hidden state is the one-hot of the prefix's row and the LM head holds the table transposed, so the logits are
    exactly ``lm_head(hidden)``: the chunked losses' head check passes and their gradient reaches the same table.
    Prefixes outside the table (after EOS, or the trainer's 4-token head probe) read row 0; they are never scored.
    """

    def __init__(self, tab: Tables, table: torch.Tensor):
        super().__init__()
        self.tab = tab
        self.lm_head = torch.nn.Linear(table.shape[0], table.shape[1], bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.lm_head.weight.copy_(table.detach().T)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False, **_):
        rows = [[self.tab.row.get(tuple(ids[PROMPT_LENGTH: s + 1]), 0) for s in range(len(ids))]
                for ids in input_ids.tolist()]
        hidden = torch.nn.functional.one_hot(torch.tensor(rows, device=input_ids.device),
                                             self.lm_head.in_features).to(torch.float64)
        return SimpleNamespace(logits=self.lm_head(hidden), hidden_states=(hidden,))


def _trainer(tmp_path, tab: Tables, chunked: bool) -> MiniLLMTrainer:
    count = len(list(tab.sequences()))
    cfg = load_config("configs/tiny/minillm.yaml", [
        f"output_dir={tmp_path}", "data.pretrain=null", "minillm.ptx_coef=0",
        # the paper mode: the expected update is the exact gradient
        "minillm.include_current=false", "minillm.gamma=1.0", "minillm.length_norm=false", "minillm.whiten=none",
        "minillm.reward_scale=1.0", "rollout.teacher_mix_alpha=0", "rollout.temperature=1.0",
        "minillm.single_step=true", "minillm.long_range=true", "minillm.single_step_weighted=false",
        f"minillm.chunked_losses={str(chunked).lower()}", "minillm.loss_chunk_size=4",
        f"rollout.num_rollouts={count}", f"rollout.chunk_size={count}", f"rollout.max_new_tokens={tab.max_len}",
        "train.micro_batch_size=1", "train.global_batch_size=1", "minillm.ppo_epochs=1", "train.max_steps=1",
        "logging.progress_bar=false"])
    strategy = build_strategy(cfg).setup()
    tokenizer = load_tokenizer(cfg.student)
    data = build_instruction_data(cfg.data, tokenizer, seed=cfg.seed)
    return MiniLLMTrainer(cfg, TabularLM(tab, tab.theta), tokenizer, data, strategy,
                          teacher=TabularLM(tab, tab.teacher))


def _enumerated_buffer(trainer: MiniLLMTrainer, tab: Tables):
    """The trainer's own rollout_and_score, with a 'sampler' that returns every sequence once."""
    seqs = list(tab.sequences())
    responses = torch.cat([tab.response(y) for y in seqs])
    prompts = torch.zeros(len(seqs), PROMPT_LENGTH, dtype=torch.long)
    trainer._next_prompts = lambda: {"input_ids": prompts, "attention_mask": torch.ones_like(prompts),
                                     "index": torch.arange(len(seqs))}
    trainer._sample = lambda *args, **kwargs: SimpleNamespace(
        response_ids=responses, response_mask=L.response_mask(responses, tab.eos).float())
    buffer = trainer.rollout_and_score()
    assert len(buffer) == len(seqs) and torch.equal(buffer.response_ids, responses)
    return seqs, buffer


def _expected_trainer_update(trainer: MiniLLMTrainer, tab: Tables) -> torch.Tensor:
    """Σ_y q_θ(y) · n(y) · ∇ micro_batch_loss({y}), as a gradient of the table [R, V] (the head's weight is its T)."""
    seqs, buffer = _enumerated_buffer(trainer, tab)
    weight = trainer.student.lm_head.weight
    total = torch.zeros_like(weight)
    for i, y in enumerate(seqs):
        mb = buffer.select(torch.tensor([i]))
        loss, parts = trainer.micro_batch_loss(mb)
        assert parts["loss"] == pytest.approx(loss.item())
        (grad,) = torch.autograd.grad(loss, weight)
        q_y = tab.seq_logprob(tab.theta, y).exp().detach()
        total += q_y * mb.response_mask.sum() * grad
    return total.T


CASES = [(3, 3, 0), (4, 2, 3)]  # (vocab incl. EOS, max length, seed): 15 and 15 sequences


@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
@pytest.mark.parametrize("vocab, max_len, seed", CASES)
def test_trainer_paper_mode_update_is_the_exact_reverse_kl_gradient(tmp_path, vocab, max_len, seed, chunked):
    tab = Tables(vocab, max_len, seed)
    kl, exact = exact_kl_gradient(tab)
    assert kl > 0.05  # the tables really differ
    trainer = _trainer(tmp_path, tab, chunked)
    assert trainer.cfg.minillm.chunked_losses == chunked  # the chunked head check accepted the tabular models
    got = _expected_trainer_update(trainer, tab)
    # float32 logits inside the trainer: agreement to ~1e-7 of the gradient's scale; a wrong wiring is off by O(1)
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < 1e-5, f"trainer's expected update vs exact ∇KL(q‖p): relative error {rel:.3g}"


def test_dev_reverse_kl_and_teacher_logprob_equal_an_independent_forward(tmp_path):
    """``MiniLLMTrainer.evaluate``'s dev/reverse_kl_k3 and dev/teacher_logprob, for a student that is not the teacher,
    equal what plain float64 forwards of both models give on the very samples the evaluation drew (recorded from its
    sampler): per row, the mean over the response tokens (first EOS included) of e^d − 1 − d with d = log p − log q,
    averaged over rows; the teacher's log-prob averaged over all response tokens. Each row is re-run alone, unpadded.
    (Scoring the teacher against itself would give k3 = 0 whatever the wiring.)"""
    from minillm.cli.train import build_trainer

    cfg = load_config("configs/tiny/minillm.yaml", [
        f"output_dir={tmp_path}", "eval.num_prompts=6", "eval.batch_size=3", "eval.max_new_tokens=10",
        "logging.progress_bar=false"])
    trainer = build_trainer(cfg, build_strategy(cfg).setup())
    drawn, sample = [], trainer._sample

    def recording(*args, **kwargs):
        out = sample(*args, **kwargs)
        drawn.append((args[2], args[3], out.response_ids, out.response_mask))  # prompt ids, mask; response, mask
        return out

    trainer._sample = recording
    got = trainer.evaluate()
    assert len(drawn) == 2  # 6 prompts in batches of 3

    k3_rows, teacher_sum, tokens = [], 0.0, 0
    with torch.no_grad():
        for prompt_ids, prompt_mask, response_ids, response_mask in drawn:
            for row in range(prompt_ids.shape[0]):
                prompt = prompt_ids[row][prompt_mask[row].bool()]
                n = int(response_mask[row].sum())
                response = response_ids[row, :n]
                full = torch.cat([prompt, response])[None]
                p = len(prompt)
                target = response[:, None]
                t_lp = torch.log_softmax(trainer.teacher(full).logits[0, p - 1:-1].double(), -1).gather(-1, target)[:, 0]
                s_lp = torch.log_softmax(trainer.student(full).logits[0, p - 1:-1].double(), -1).gather(-1, target)[:, 0]
                d = t_lp - s_lp
                k3_rows.append(float((d.exp() - 1 - d).mean()))
                teacher_sum += float(t_lp.sum())
                tokens += n
    assert min(k3_rows) > 1e-3  # the student really differs from the teacher on every row
    assert got["dev/reverse_kl_k3"] == pytest.approx(sum(k3_rows) / len(k3_rows), rel=1e-4)
    assert got["dev/teacher_logprob"] == pytest.approx(teacher_sum / tokens, rel=1e-4)
    trainer.metrics.close()
