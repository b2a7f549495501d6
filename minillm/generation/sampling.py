"""Teacher-mixed sampling on stock transformers: the exact (naive) decoding loop.

MiniLLM draws its rollouts from the teacher-mixed distribution p̃ = (1−α)·q_θ + α·p (paper: "teacher-mixed
sampling"; DESIGN §1, §5; lmops-notes §3). The official code patches ``GenerationMixin._sample`` in a forked
transformers; here the loop is our own, so any HF causal LM that takes ``input_ids`` / ``attention_mask`` /
``position_ids`` / ``past_key_values`` works unmodified:

- prompts are **left-padded**; both models keep their own ``DynamicCache``;
- position ids are cumsum(attention_mask) − 1 (0 on padding) and are passed explicitly at every step, so the
  student and teacher see the same positions whatever their architectures' defaults;
- at each step both models' last logits go to fp32 and through the *same* processing (temperature, top-k,
  top-p, as the reference's shared ``logits_processor``), then p̃ = (1−α)·softmax(s) + α·softmax(t) and
  y_t ~ p̃ (argmax p̃ when greedy);
- with α = 0 the teacher never runs (it may be ``None``).

This module is the exactness reference. Faster engines (static caches, CUDA graphs, running the teacher only on
some steps, DESIGN §7) must match its distribution. ``teacher_forced_logprobs`` recomputes the same per-token
log-probs with one forward over [prompt; response]. The tests use it to check the loop, and scoring can use
it too.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ..losses.heads import _accepts_logits_to_keep  # noqa: F401 — engine and speculative import it from here

__all__ = ["SampleOutput", "process_logits", "mixed_sample", "teacher_forced_logprobs", "position_ids_from_mask"]


# --------------------------------------------------------------------------------------------- logits processing
def process_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Sampling warpers in HF's order: ``logits / T`` → top-k → top-p. Removed entries are set to −inf.

    logits [..., V] (usually [B, V]) → fp32 [..., V]. ``top_k = 0`` and ``top_p = 1.0`` switch the filters off.
    Top-k keeps every entry ≥ the k-th largest value, so ties at the boundary survive, as in HF's
    ``TopKLogitsWarper``. Top-p keeps the smallest set of most likely tokens whose probability adds up to at
    least ``top_p``. A token is kept when the mass of the tokens ranked strictly above it is below ``top_p``,
    the same rule as HF's ``TopPLogitsWarper``. The most likely token always survives. Tokens tied with the last
    kept one are kept too, as in top-k. HF's result instead depends on how its sort orders the ties.
    """
    if not temperature > 0.0 or not math.isfinite(temperature):
        raise ValueError(f"minillm.generation.sampling.process_logits: temperature={temperature} must be a finite number > 0 "
                         "(use do_sample=False for greedy decoding)")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"minillm.generation.sampling.process_logits: top_k={top_k} must be an integer ≥ 0 (0 = off)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"minillm.generation.sampling.process_logits: top_p={top_p} must lie in (0, 1] (1.0 = off)")
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth_largest = torch.topk(scores, int(top_k), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth_largest, -math.inf)
    if top_p < 1.0:
        sorted_scores = torch.sort(scores, dim=-1, descending=True).values
        sorted_probs = sorted_scores.softmax(dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # exclusive cumsum: 0 for the top token
        kept = (mass_above < top_p).sum(dim=-1, keepdim=True)  # ≥ 1: mass_above is 0 for the top token
        threshold = sorted_scores.gather(-1, kept - 1)
        scores = scores.masked_fill(scores < threshold, -math.inf)
    return scores


# --------------------------------------------------------------------------------------------- output record
@dataclass
class SampleOutput:
    """Responses drawn by :func:`mixed_sample`. B rows, P prompt columns (left-padded), L ≤ max_new_tokens.

    Log-probs are taken under the *processed* distributions (after temperature / top-k / top-p). A token that
    one model's filter removed has log-prob −inf under that model. This can happen when α > 0 and the other model
    proposed the token.
    """

    prompt_ids: Tensor  # [B, P] long, the prompts as given (left-padded)
    prompt_mask: Tensor  # [B, P] long/bool as given, 1 on prompt tokens
    response_ids: Tensor  # [B, L] long, sampled tokens; pad_token_id after a row's first EOS
    response_mask: Tensor  # [B, L] float, 1 up to and including the first EOS, 0 after
    student_logprobs: Tensor  # [B, L] float32, log q(y_t | y_<t, x), processed student distribution; 0 where masked
    teacher_logprobs: Tensor | None  # [B, L] float32, same for the teacher when it ran (α > 0), else None
    mixed_logprobs: Tensor  # [B, L] float32, log p̃(y_t | y_<t, x) = log((1−α)q + αp), 0 where masked

    def to(self, device: torch.device | str) -> "SampleOutput":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return SampleOutput(**{k: (v.to(device) if v is not None else None) for k, v in moved.items()})


# --------------------------------------------------------------------------------------------- helpers
def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """[B, S] mask → [B, S] long positions cumsum(mask) − 1, clamped at 0 on (left) padding.

    Passing these explicitly makes a left-padded row see the same positions as the unpadded prompt.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _cache_keyword(model: torch.nn.Module) -> str:
    """transformers >= 5.24 names the cache argument ``cache`` (``past_key_values`` is deprecated); earlier versions
    only know ``past_key_values``."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(model: torch.nn.Module):
    from transformers import DynamicCache  # heavy import kept out of `import minillm`

    config = getattr(model, "config", None)
    try:
        return DynamicCache(config=config)
    except TypeError:  # a config DynamicCache cannot read (custom models): a plain cache still works
        return DynamicCache()


def _eos_tensor(eos_token_id: int | Sequence[int] | Tensor | None, device: torch.device) -> Tensor:
    if eos_token_id is None:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.as_tensor(eos_token_id, dtype=torch.long, device=device).reshape(-1)


@contextlib.contextmanager
def _eval_mode(*models: torch.nn.Module | None) -> Iterator[None]:
    """Put the models in eval mode (no dropout while sampling, as the reference), then restore every submodule's
    previous train/eval flag exactly. The flags are restored per submodule, because a model can hold a mix of
    flags, for example a frozen part kept in eval."""
    saved = [(module, module.training) for model in models if model is not None for module in model.modules()]
    for model in models:
        if model is not None:
            model.eval()
    try:
        yield
    finally:
        for module, was_training in saved:
            module.training = was_training


class _CachedLM:
    """One model's incremental-decoding state: its own KV cache, and the device where its inputs must live."""

    def __init__(self, model: torch.nn.Module, work_device: torch.device, vocab_size: int | None = None):
        self.model = model
        self.device = _model_device(model)
        self.work_device = work_device
        self.vocab_size = vocab_size
        self.cache = _new_cache(model)
        self.keep_last_only = _accepts_logits_to_keep(model)
        self.cache_kw = _cache_keyword(model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """Feed the new tokens [B, S] (full mask [B, past+S], their positions [B, S]) → last logits [B, V] fp32."""
        kwargs = {self.cache_kw: self.cache}
        if self.keep_last_only:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                         position_ids=position_ids.to(self.device), use_cache=True, **kwargs)
        returned = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if returned is not None:  # models may hand back a new cache object
            self.cache = returned
        logits = out.logits[:, -1]
        if self.vocab_size is not None:  # padded embedding rows are never real tokens: never draw them
            logits = logits[:, :self.vocab_size]
        return logits.to(device=self.work_device, dtype=torch.float32)


def _check_prompts(input_ids: Tensor, attention_mask: Tensor, where: str) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"minillm.generation.sampling.{where}: input_ids must be [B, P], got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"minillm.generation.sampling.{where}: attention_mask shape {tuple(attention_mask.shape)} must equal "
                         f"input_ids shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0 or not bool(attention_mask[:, -1].bool().all()):
        raise ValueError(f"minillm.generation.sampling.{where}: prompts must be left-padded and non-empty (the last column of "
                         "attention_mask must be 1 in every row); use tokenizer.padding_side='left' or the prompt "
                         "collator")


def _check_vocab(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"minillm.generation.sampling: the student's logits have {student_logits.shape[-1]} entries but the teacher's have "
            f"{teacher_logits.shape[-1]}; teacher-mixed sampling needs one shared vocabulary (same tokenizer). "
            "Resize the embeddings of one model (model.resize_token_embeddings) to the other's size")


# --------------------------------------------------------------------------------------------- the decoding loop
def check_sampling_args(where: str, *, alpha: float, teacher: torch.nn.Module | None, max_new_tokens: int,
                        eos_token_id: int | Sequence[int] | Tensor | None, pad_token_id: int | None) -> int:
    """The argument checks every teacher-mixed sampler shares; returns the pad id (EOS when none is given)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{where}: alpha={alpha} must lie in [0, 1]")
    if alpha > 0.0 and teacher is None:
        raise ValueError(f"{where}: alpha={alpha} > 0 needs a teacher model (got None)")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"{where}: max_new_tokens={max_new_tokens} must be an integer ≥ 1")
    if pad_token_id is None:
        if eos_token_id is None:
            raise ValueError(f"{where}: pad_token_id and eos_token_id are both None; give pad_token_id (the "
                             "reference pads with EOS)")
        pad_token_id = int(_eos_tensor(eos_token_id, torch.device("cpu"))[0])
    return int(pad_token_id)


@torch.no_grad()  # without it every dynamic-cache torch.cat is recorded for autograd: memory grows as length²
def mixed_sample(student: torch.nn.Module, teacher: torch.nn.Module | None, input_ids: Tensor,
                 attention_mask: Tensor, *, max_new_tokens: int, alpha: float = 0.2, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None,
                 pad_token_id: int | None, generator: torch.Generator | None = None,
                 do_sample: bool = True, vocab_size: int | None = None) -> SampleOutput:
    """Draw responses y_t ~ p̃ = (1−α)·q(·|y_<t, x) + α·p(·|y_<t, x) token by token, exactly.

    input_ids, attention_mask [B, P] (left-padded). Both distributions get the same processing
    (:func:`process_logits`) before they are mixed, as in the reference fork. ``do_sample=False`` takes
    argmax p̃ instead of drawing. ``generator`` (on the student's device) makes the draws reproducible. With
    α = 0 the teacher is never run and may be ``None``. A row stops at its first EOS (any id in ``eos_token_id``)
    and is filled with ``pad_token_id`` after that. The loop ends early once every row has stopped. The models
    run in eval mode under no_grad; their previous modes are restored afterwards. The result lives on the
    student's device. ``vocab_size`` cuts both models' logits to the tokenizer's entries (models whose embedding
    matrix is padded, e.g. Qwen2.5, would otherwise be able to draw ids no tokenizer knows).
    """
    pad_token_id = check_sampling_args("minillm.generation.sampling.mixed_sample", alpha=alpha, teacher=teacher,
                                       max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                       pad_token_id=pad_token_id)
    _check_prompts(input_ids, attention_mask, "mixed_sample")
    process_logits(torch.zeros(1, 1), temperature, top_k, top_p)  # validate the warper settings before any forward

    device = _model_device(student)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"minillm.generation.sampling.mixed_sample: the generator lives on {generator.device} but sampling "
                         f"runs on the student's device {device}; create torch.Generator(device={str(device)!r})")
    use_teacher = alpha > 0.0
    ids = input_ids.to(device)
    mask = prompt_mask = attention_mask.to(device)  # `mask` grows by one column per step; prompt_mask does not
    batch = ids.shape[0]
    eos = _eos_tensor(eos_token_id, device)
    pad = torch.full((batch,), int(pad_token_id), dtype=torch.long, device=device)
    # log(1−α) and log α of the mixture in log space (math.log(0) is undefined; −inf is the right limit)
    log_w_student = math.log1p(-alpha) if alpha < 1.0 else -math.inf
    log_w_teacher = math.log(alpha) if alpha > 0.0 else -math.inf

    tokens: list[Tensor] = []
    valid: list[Tensor] = []
    student_lp: list[Tensor] = []
    teacher_lp: list[Tensor] = []
    mixed_lp: list[Tensor] = []

    with _eval_mode(student, teacher if use_teacher else None):
        s_model = _CachedLM(student, device, vocab_size)
        t_model = _CachedLM(teacher, device, vocab_size) if use_teacher else None
        positions = position_ids_from_mask(mask)
        s_logits = s_model.forward(ids, mask, positions)  # prefill: [B, V]
        t_logits = t_model.forward(ids, mask, positions) if t_model is not None else None
        if t_logits is not None:
            _check_vocab(s_logits, t_logits)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        last_position = positions[:, -1:]  # [B, 1]; the last prompt column is a real token (left padding)

        for step in range(int(max_new_tokens)):
            s_logp = torch.log_softmax(process_logits(s_logits, temperature, top_k, top_p), dim=-1)  # [B, V]
            if t_logits is not None:
                t_logp = torch.log_softmax(process_logits(t_logits, temperature, top_k, top_p), dim=-1)
                probs = (1.0 - alpha) * s_logp.exp() + alpha * t_logp.exp()  # p̃ [B, V]
            else:
                t_logp = None
                probs = s_logp.exp()
            if do_sample:
                next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # [B]
            else:
                next_token = probs.argmax(dim=-1)
            alive = ~done
            next_token = torch.where(alive, next_token, pad)
            picked = next_token.unsqueeze(1)
            s_tok = s_logp.gather(1, picked).squeeze(1)
            zero = torch.zeros_like(s_tok)
            # torch.where rather than a product: a filtered-out token has log-prob −inf, and −inf·0 is NaN
            student_lp.append(torch.where(alive, s_tok, zero))
            if t_logp is not None:
                t_tok = t_logp.gather(1, picked).squeeze(1)
                teacher_lp.append(torch.where(alive, t_tok, zero))
                m_tok = torch.logaddexp(log_w_student + s_tok, log_w_teacher + t_tok)
            else:
                m_tok = s_tok
            mixed_lp.append(torch.where(alive, m_tok, zero))
            tokens.append(next_token)
            valid.append(alive)
            done = done | torch.isin(next_token, eos)
            if step == max_new_tokens - 1 or bool(done.all()):  # the only host sync of the step
                break
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            last_position = last_position + 1
            s_logits = s_model.forward(picked, mask, last_position)
            if t_model is not None:
                t_logits = t_model.forward(picked, mask, last_position)

    return SampleOutput(
        prompt_ids=ids,
        prompt_mask=prompt_mask,
        response_ids=torch.stack(tokens, dim=1),
        response_mask=torch.stack(valid, dim=1).float(),
        student_logprobs=torch.stack(student_lp, dim=1),
        teacher_logprobs=torch.stack(teacher_lp, dim=1) if use_teacher else None,
        mixed_logprobs=torch.stack(mixed_lp, dim=1),
    )


# --------------------------------------------------------------------------------------------- teacher forcing
@torch.no_grad()
def teacher_forced_logprobs(model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                            response_mask: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                            chunk_size: int = 64) -> Tensor:
    """Processed log-probs of given responses under ``model``, from one forward over [prompt; response].

    prompt_ids, prompt_mask [B, P] (left-padded); response_ids, response_mask [B, L] → fp32 [B, L] with
    log softmax(process_logits(z_t))[y_t] on valid tokens and 0 where response_mask = 0. The response columns are
    attended to (mask 1) and positions continue from the prompt, exactly as in :func:`mixed_sample`, so a sampled
    response scores the same here as in the loop. Response columns after EOS come after every scored
    position, so causality keeps them out of every score. The processing (and its fp32 copy) runs over ``chunk_size``
    response positions at a time. The model runs in eval mode under no_grad; its mode is restored afterwards.
    """
    _check_prompts(prompt_ids, prompt_mask, "teacher_forced_logprobs")
    if response_ids.dim() != 2 or response_ids.shape[0] != prompt_ids.shape[0]:
        raise ValueError(f"minillm.generation.sampling.teacher_forced_logprobs: response_ids must be [B, L] with B = "
                         f"{prompt_ids.shape[0]}, got shape {tuple(response_ids.shape)}")
    if response_mask.shape != response_ids.shape:
        raise ValueError(f"minillm.generation.sampling.teacher_forced_logprobs: response_mask shape "
                         f"{tuple(response_mask.shape)} must equal response_ids shape {tuple(response_ids.shape)}")
    process_logits(torch.zeros(1, 1), temperature, top_k, top_p)  # validate before the forward
    device = _model_device(model)
    prompt_len, length = prompt_ids.shape[1], response_ids.shape[1]
    if length == 0:
        return torch.zeros(response_ids.shape, dtype=torch.float32, device=response_ids.device)
    response_ids = response_ids.to(device)
    input_ids = torch.cat([prompt_ids.to(device), response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.to(device), prompt_mask.new_ones(response_ids.shape).to(device)], dim=1)
    kwargs = {}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = length + 1  # positions P−1 … P+L−1; the last one predicts nothing we score
    with _eval_mode(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False, **kwargs).logits
    logits = logits[:, -(length + 1):-1] if kwargs else logits[:, prompt_len - 1: prompt_len - 1 + length]
    pieces = []
    for start in range(0, length, max(1, int(chunk_size))):
        chunk = process_logits(logits[:, start:start + chunk_size], temperature, top_k, top_p)  # [B, c, V] fp32
        tokens = response_ids[:, start:start + chunk_size].unsqueeze(-1)
        pieces.append((chunk.gather(-1, tokens) - torch.logsumexp(chunk, dim=-1, keepdim=True)).squeeze(-1))
    logprobs = torch.cat(pieces, dim=1)
    keep = response_mask.to(device).bool()
    return torch.where(keep, logprobs, torch.zeros_like(logprobs))
