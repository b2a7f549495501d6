"""Speculative teacher-mixed rollouts: the student drafts, the teacher verifies (DESIGN §7 method (b)).

Target: y_t ~ p̃ = (1−α)·q + α·p token by token, where q and p are the student's and the teacher's distributions
after the same processing (:func:`minillm.generation.sampling.process_logits`: temperature → top-k → top-p), exactly as the
naive loop (:func:`minillm.generation.sampling.mixed_sample`) mixes them. Each round, for the whole batch in lockstep:

* **draft**: the student samples k tokens d_1..d_k autoregressively from q, keeping q_1..q_k;
* **verify**: the teacher runs ONE forward over the pending token and d_1..d_{k−1}, giving p_1..p_k;
* **accept** d_j with probability min(1, p̃_j(d_j)/q_j(d_j)) = min(1, (1−α) + α·p_j(d_j)/q_j(d_j)) ≥ 1−α, with one
  uniform per row and draft; at a row's first rejection j the replacement is drawn from the residual
  norm(max(0, p̃_j − q_j)) = norm(max(0, p_j − q_j)) (α cancels) and the row's round ends. No bonus token after an
  all-accepted round (it would need q_{k+1}, one more student forward).

**Why this is exact.** It is the speculative sampling of Leviathan et al. / Chen et al. (2023) with q as the draft
and p̃ as the target: for a fixed prefix, P(token = v) = q(v)·min(1, p̃(v)/q(v)) + P(reject)·residual(v) = p̃(v),
so every row's sequence follows p̃ token by token, whatever number of drafts a round proposes. Each row draws its
own uniforms and tokens, so given the prompts the rows are **independent** (unlike the coin engine,
:mod:`minillm.generation.engine`, whose rows share one coin per step): at every round a row's new tokens depend only on its
own prefix and fresh randomness, and the draft count (the same for the batch) cannot bias a row because the
round is exact for any draft count. The teacher runs once per round; the expected share of accepted drafts per
token is 1 − α·TV(q, p) ≥ 1 − α.

**Slots and holes.** Rows accept different numbers of drafts, yet both models share one slot layout: every round
appends the same slots for the whole batch ([pending, d_1..d_{k−1}]; the prompt instead of the pending token in
the first round), and one per-row 2-D attention mask marks the slots of rejected drafts 0 ("holes", like left
padding in the middle) while explicit ``position_ids`` count only a row's valid tokens. A row with holes thus sees
exactly its compact sequence. Each model keeps a ``DynamicCache`` and runs eagerly: this first version has no
static cache and no CUDA graphs (``static_cache=True`` / ``cuda_graphs=True`` are refused).

**Routes.** α = 0: every draft is accepted and the teacher never runs (pure student sampling; same draws as the
naive loop for the same generator). α = 1: every token comes from the teacher, so drafting would be wasted work;
it is handed to :func:`minillm.generation.engine.fast_mixed_sample` (teacher-only decoding, then one student scoring
forward; eager, dynamic cache); the counters then report no rounds and no drafts. ``do_sample=False`` (argmax of
the mixture) is handed to the naive loop, as the coin engine does, and returns its plain :class:`SampleOutput`.

**A served teacher** (``teacher.server``: :class:`minillm.serve.remote.RemoteTeacher`, which keeps no KV cache):
each verification is one request over every slot so far (:class:`_PrefixLM`), the same tokens, 2-D mask and
positions as the cached forward, so the rollout is the colocated one up to rounding, at O(rounds · length) teacher
work. It has no α = 1 route (that route decodes with the teacher's cache) and refuses ``do_sample=False``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

from .engine import _output_rows, check_engine_inputs, fast_mixed_sample
from .sampling import (SampleOutput, _accepts_logits_to_keep, _cache_keyword, _check_vocab, _eos_tensor, _eval_mode,
                       _model_device, _new_cache, check_sampling_args, mixed_sample, position_ids_from_mask,
                       process_logits)

__all__ = ["SpeculativeSampleOutput", "speculative_mixed_sample"]

_WHERE = "minillm.generation.speculative.speculative_mixed_sample"


@dataclass
class SpeculativeSampleOutput(SampleOutput):
    """:class:`SampleOutput` plus what the engine did. Every response token is either an accepted student draft or
    a replacement drawn at a rejection, so ``proposed_drafts`` (drafts the acceptance test decided a response token
    with) equals the number of response tokens, and ``accepted_drafts / proposed_drafts`` is the per-token
    acceptance rate (≥ 1 − α in expectation). Drafts discarded after a rejection, EOS or max_new_tokens are not
    counted. With α = 0 every draft is accepted; on the α = 1 route no drafts are made (both counts 0)."""

    student_forwards: int  # forward calls the student made (prefill and one per drafted token fed back)
    teacher_forwards: int  # same for the teacher: one per round (0 when α = 0)
    rounds: int  # draft-and-verify rounds
    accepted_drafts: int  # response tokens that are accepted student drafts
    proposed_drafts: int  # response tokens decided by an acceptance test (accepted + replaced)

    def to(self, device: torch.device | str) -> "SpeculativeSampleOutput":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return SpeculativeSampleOutput(**{k: (v.to(device) if isinstance(v, Tensor) else v)
                                          for k, v in moved.items()})


class _SlotLM:
    """One model over the shared slot layout: its own ``DynamicCache``, eager forwards, fp32 logits."""

    def __init__(self, model: torch.nn.Module, work_device: torch.device, vocab_size: int | None):
        self.model = model
        self.device = _model_device(model)
        self.work_device = work_device
        self.vocab_size = vocab_size
        self.cache = _new_cache(model)
        self.cache_kw = _cache_keyword(model)
        self.keep_kw = _accepts_logits_to_keep(model)
        self.forwards = 0

    def forward(self, input_ids: Tensor, positions: Tensor, mask: Tensor, keep: int) -> Tensor:
        """Append [B, S] slots holding ``input_ids`` at ``positions`` [B, S]; ``mask`` [B, cached + S] is the whole
        slot mask (0 on left padding and holes). Returns the last ``keep`` logits [B, keep, V] in fp32."""
        kwargs = {self.cache_kw: self.cache, "use_cache": True}
        if self.keep_kw:
            kwargs["logits_to_keep"] = keep
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), **kwargs)
        self.forwards += 1
        returned = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if returned is not None:  # models may hand back a new cache object
            self.cache = returned
        logits = out.logits[:, -keep:]
        if self.vocab_size is not None:  # padded embedding rows are never real tokens: never draw them
            logits = logits[..., :self.vocab_size]
        return logits.to(device=self.work_device, dtype=torch.float32)


class _PrefixLM(_SlotLM):
    """A model that keeps no KV cache (a served teacher, ``teacher.server``: ``is_remote_teacher``) over the same
    slot layout: it remembers every slot it was fed and each forward sends them all, with the whole slot mask (holes
    included) and the explicit positions, so a verification is one request on the full prefix. The logits are those
    of the cached forward up to rounding (the same tokens, mask and positions); the work is O(rounds · length)."""

    def __init__(self, model: torch.nn.Module, work_device: torch.device, vocab_size: int | None):
        self.model, self.work_device, self.vocab_size = model, work_device, vocab_size
        self.device = _model_device(model)
        self.ids = self.positions = None
        self.forwards = 0

    def forward(self, input_ids: Tensor, positions: Tensor, mask: Tensor, keep: int) -> Tensor:
        self.ids = input_ids if self.ids is None else torch.cat([self.ids, input_ids], dim=1)
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=1)
        out = self.model(input_ids=self.ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=self.positions.to(self.device), logits_to_keep=keep)
        self.forwards += 1
        logits = out.logits[:, -keep:]
        if self.vocab_size is not None:
            logits = logits[..., :self.vocab_size]
        return logits.to(device=self.work_device, dtype=torch.float32)


def _check_engine_args(draft_tokens: int, static_cache: bool | None, cuda_graphs: bool | None) -> int:
    if isinstance(draft_tokens, bool) or int(draft_tokens) != draft_tokens or draft_tokens < 1:
        raise ValueError(f"{_WHERE}: draft_tokens={draft_tokens!r} must be an integer ≥ 1 (the number of tokens the "
                         "student drafts per round; 4 is a good start)")
    for name, value in (("static_cache", static_cache), ("cuda_graphs", cuda_graphs)):
        if value:
            raise ValueError(f"{_WHERE}: {name}=True is not supported: the speculative engine runs eagerly on a "
                             f"DynamicCache; pass {name}=None or False, or use rollout.engine 'fast' for "
                             "static caches and CUDA graphs")
    return int(draft_tokens)


@torch.no_grad()
def speculative_mixed_sample(student: torch.nn.Module, teacher: torch.nn.Module | None, input_ids: Tensor,
                             attention_mask: Tensor, *, max_new_tokens: int, alpha: float = 0.2,
                             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                             eos_token_id: int | Sequence[int] | None, pad_token_id: int | None,
                             generator: torch.Generator | None = None, do_sample: bool = True, score: bool = True,
                             static_cache: bool | None = None, cuda_graphs: bool | None = None,
                             vocab_size: int | None = None, draft_tokens: int = 4) -> SampleOutput:
    """Draw y ~ p̃ = (1−α)·q + α·p exactly, with independent rows, the student drafting ``draft_tokens`` tokens
    per round and the teacher verifying them in one forward.

    Arguments and result as :func:`minillm.generation.engine.fast_mixed_sample` (left-padded [B, P] prompts; rows stop at
    their first EOS and are padded after it; log-probs under the processed distributions, 0 where masked; columns
    where every row is padding are dropped). The teacher's log-probs come free with the verification, so they
    are returned whatever ``score`` says (``score`` only matters on the α = 1 route). ``static_cache`` /
    ``cuda_graphs`` must be None or False. A served teacher (``is_remote_teacher``, no KV cache) verifies each
    round on the full prefix and takes the draft/verify loop at α = 1 too (exact for any α). Returns a
    :class:`SpeculativeSampleOutput` (a plain :class:`SampleOutput` for ``do_sample=False``, from the naive loop).
    """
    draft_tokens = _check_engine_args(draft_tokens, static_cache, cuda_graphs)
    pad_token_id = check_sampling_args(_WHERE, alpha=alpha, teacher=teacher, max_new_tokens=max_new_tokens,
                                       eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    common = dict(max_new_tokens=max_new_tokens, alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p,
                  eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator, vocab_size=vocab_size)
    remote = getattr(teacher, "is_remote_teacher", False)  # a served teacher: no KV cache, full-prefix requests
    if remote and not do_sample:
        raise ValueError(f"{_WHERE}: do_sample=False with a served teacher (teacher.server) would decode with the "
                         "teacher's KV cache, which the server does not keep; sample (do_sample=True)")
    if not do_sample:  # argmax of the mixture needs both models at every step
        return mixed_sample(student, teacher, input_ids, attention_mask, do_sample=False, **common)
    if alpha == 1.0 and not remote:  # every token is the teacher's: drafting would be wasted work
        out = fast_mixed_sample(student, teacher, input_ids, attention_mask, score=score, static_cache=False,
                                cuda_graphs=False, **common)
        base = {f.name: getattr(out, f.name) for f in fields(SampleOutput)}
        return SpeculativeSampleOutput(**base, student_forwards=out.student_forwards,
                                       teacher_forwards=out.teacher_forwards, rounds=0, accepted_drafts=0,
                                       proposed_drafts=0)
    warp = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    device = check_engine_inputs(_WHERE, student, input_ids, attention_mask, generator, warp)
    use_teacher = alpha > 0.0
    if use_teacher and vocab_size is None and _output_rows(student) != _output_rows(teacher):
        raise ValueError(f"{_WHERE}: the student has {_output_rows(student)} output rows and the teacher "
                         f"{_output_rows(teacher)}; teacher-mixed sampling needs one shared vocabulary (resize one "
                         "model's embeddings to the other's size)")

    length, k = int(max_new_tokens), draft_tokens
    ids, prompt_mask = input_ids.to(device), attention_mask.to(device)
    batch = ids.shape[0]
    rows = torch.arange(batch, device=device)
    eos = _eos_tensor(eos_token_id, device)
    width = length + k  # a round may write up to k − 1 columns past max_new_tokens before the cut
    response = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    valid = torch.zeros((batch, width), dtype=torch.bool, device=device)
    s_lp = torch.zeros((batch, width), dtype=torch.float32, device=device)
    t_lp = torch.zeros_like(s_lp)
    committed = torch.zeros(batch, dtype=torch.long, device=device)  # response tokens per row so far
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    prompt_positions = position_ids_from_mask(prompt_mask)
    first_position = prompt_positions[:, -1:] + 1  # [B, 1] position of y_0 (the last prompt column is real)
    # slots holding tokens past max_new_tokens only feed tokens that are cut: clamp them inside the model's range
    last_position = first_position + length - 1
    cached_mask = prompt_mask.new_zeros(batch, 0).long()  # [B, slots in both caches]
    pending: Tensor | None = None  # [B, 1] each row's last response token, not yet in the caches
    rounds = 0
    accepted = torch.zeros((), dtype=torch.long, device=device)  # summed on the device: no host sync per round
    proposed = torch.zeros_like(accepted)
    log_w_student = math.log1p(-alpha) if alpha < 1.0 else -math.inf  # α = 1 reaches here only with a served teacher
    log_w_teacher = math.log(alpha) if use_teacher else -math.inf

    with _eval_mode(student, teacher if use_teacher else None):
        s_lm = _SlotLM(student, device, vocab_size)
        t_lm = (_PrefixLM if remote else _SlotLM)(teacher, device, vocab_size) if use_teacher else None
        while True:
            active = ~done
            kk = min(k, length - int(committed[active].min()))  # drafts this round (a host sync, like done.all())
            base = first_position + committed[:, None] - 1  # [B, 1] position of the pending token; d_j at base + j
            if pending is None:  # first round: the prompt is fed instead of a pending token
                feed_ids, feed_positions, feed_mask = ids, prompt_positions, prompt_mask.long()
            else:
                feed_ids, feed_positions, feed_mask = pending, base.clamp(max=last_position), active.long()[:, None]
            slot_mask = torch.cat([cached_mask, feed_mask], dim=1)
            draft_positions = (base + torch.arange(1, kk, device=device)).clamp(max=last_position)  # [B, kk − 1]

            # draft: the student samples d_1..d_kk from its processed q, feeding each draft but the last back
            logits = s_lm.forward(feed_ids, feed_positions, slot_mask, 1)[:, -1]
            drafts, student_logps = [], []
            for j in range(kk):
                logq = torch.log_softmax(process_logits(logits, **warp), dim=-1)  # [B, V]
                draft = torch.multinomial(logq.exp(), 1, generator=generator)  # [B, 1]
                drafts.append(draft)
                student_logps.append(logq)
                if j < kk - 1:
                    slot_mask = torch.cat([slot_mask, active.long()[:, None]], dim=1)
                    logits = s_lm.forward(draft, draft_positions[:, j:j + 1], slot_mask, 1)[:, -1]
            drafts_t = torch.cat(drafts, dim=1)  # [B, kk]
            logq = torch.stack(student_logps, dim=1)  # [B, kk, V]
            steps = torch.arange(kk, device=device)

            if use_teacher:
                # verify: one teacher forward over the same slots gives p_1..p_kk
                t_logits = t_lm.forward(torch.cat([feed_ids, drafts_t[:, :-1]], dim=1),
                                        torch.cat([feed_positions, draft_positions], dim=1), slot_mask, kk)
                if rounds == 0:
                    _check_vocab(logits, t_logits)
                logp = torch.log_softmax(process_logits(t_logits, **warp), dim=-1)  # [B, kk, V]
                q_draft = logq.gather(-1, drafts_t[..., None]).squeeze(-1).exp()
                p_draft = logp.gather(-1, drafts_t[..., None]).squeeze(-1).exp()
                uniforms = torch.rand((batch, kk), generator=generator, device=device)
                # u < p̃/q, multiplied out (q(d) > 0: d was drawn from q)
                accept = uniforms * q_draft < (1.0 - alpha) * q_draft + alpha * p_draft
                n_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # [B] leading accepts
                at = n_accepted.clamp(max=kk - 1)  # the rejected position (ignored where all were accepted)
                p_at, q_at = logp[rows, at].exp(), logq[rows, at].exp()  # [B, V]
                residual = (p_at - q_at).clamp(min=0.0)
                # a rejection implies p(d) < q(d), hence residual mass > 0; rounding could still zero it: fall back
                residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_at)
                replacement = torch.multinomial(residual, 1, generator=generator)  # [B, 1]
                tokens = torch.where(steps < n_accepted[:, None], drafts_t, replacement)  # [B, kk]
                produced = torch.where(n_accepted < kk, n_accepted + 1, n_accepted)
            else:  # α = 0: the target is q itself, every draft is accepted
                logp = None
                n_accepted = torch.full((batch,), kk, dtype=torch.long, device=device)
                tokens, produced = drafts_t, n_accepted

            # keep tokens up to a row's first EOS and max_new_tokens; done rows keep nothing
            in_round = steps < produced[:, None]
            is_eos = torch.isin(tokens, eos) & in_round
            first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1), kk)
            kept = torch.minimum(torch.minimum(produced, first_eos + 1), length - committed)
            kept = torch.where(active, kept, torch.zeros_like(kept))
            keep = steps < kept[:, None]  # [B, kk]
            cols = committed[:, None] + steps  # < width: committed ≤ max_new_tokens, kk ≤ k
            response.scatter_(1, cols, torch.where(keep, tokens, pad_token_id))
            valid.scatter_(1, cols, keep)
            s_tok = logq.gather(-1, tokens[..., None]).squeeze(-1)
            s_lp.scatter_(1, cols, torch.where(keep, s_tok, 0.0))
            if logp is not None:
                t_tok = logp.gather(-1, tokens[..., None]).squeeze(-1)
                t_lp.scatter_(1, cols, torch.where(keep, t_tok, 0.0))
            accepted += (keep & (steps < n_accepted[:, None])).sum()
            proposed += keep.sum()
            rounds += 1

            # the caches now hold this round's slots: rejected drafts become holes
            drafts_valid = (torch.arange(1, kk, device=device) <= n_accepted[:, None]) & active[:, None]
            cached_mask = torch.cat([cached_mask, feed_mask, drafts_valid.long()], dim=1)
            pending = tokens.gather(1, (produced - 1)[:, None])  # the round's last token goes in next round
            committed = committed + kept
            done = done | (is_eos & keep).any(1) | (committed >= length)
            if bool(done.all()):
                break

    steps_out = max(1, int(valid.any(0).sum()))  # trailing all-padding columns dropped, as the naive loop stops
    keep_mask = valid[:, :steps_out]
    student_lp = s_lp[:, :steps_out].clone()
    teacher_lp = mixed_lp = None
    if use_teacher:
        teacher_lp = t_lp[:, :steps_out].clone()
        mixed = torch.logaddexp(log_w_student + student_lp, log_w_teacher + teacher_lp)
        mixed_lp = torch.where(keep_mask, mixed, torch.zeros_like(mixed))
    else:
        mixed_lp = student_lp
    return SpeculativeSampleOutput(
        prompt_ids=ids, prompt_mask=prompt_mask, response_ids=response[:, :steps_out].clone(),
        response_mask=keep_mask.float(), student_logprobs=student_lp, teacher_logprobs=teacher_lp,
        mixed_logprobs=mixed_lp, student_forwards=s_lm.forwards,
        teacher_forwards=t_lm.forwards if t_lm is not None else 0, rounds=rounds,
        accepted_drafts=int(accepted), proposed_drafts=int(proposed))
