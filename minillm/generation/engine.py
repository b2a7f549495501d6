"""Fast exact teacher-mixed rollouts: the teacher runs only on the steps a shared coin gives it (DESIGN §7 (a)).

The naive loop (:func:`minillm.generation.sampling.mixed_sample`) runs student *and* teacher at every step and draws
y_t ~ p̃ = (1−α)·q + α·p. This engine draws the same distribution with far fewer teacher forwards:

* before decoding, one coin c_t ~ Bernoulli(α) is drawn per step, shared by the whole batch;
* at step t, if c_t = 1 the token is drawn from the teacher's processed distribution p(·|y_<t, x), else from the
  student's q(·|y_<t, x). Both use :func:`minillm.generation.sampling.process_logits` (temperature → top-k → top-p), the
  same processing the naive sampler applies before mixing;
* a model only runs when its coin side comes up. It then *catches up*: one forward over every token it has not
  seen yet (the prompt on its first run), writing them into its own KV cache.

**Why this is exact.** The coins are drawn before any token and independently of them, so for every row and
step, P(y_t = v | y_<t, x) = P(c_t = 0)·q(v|y_<t, x) + P(c_t = 1)·p(v|y_<t, x) = p̃(v | y_<t, x): every sequence
follows p̃ token by token, exactly like the naive sampler. Rows of one batch share the coins, so they are
*not* independent of each other (they are conditionally independent given the coins). Each row's marginal is
exact, which is all the policy-gradient estimator needs (it averages per-row terms); the variance across a
batch is a little higher than with independent rows. Expected teacher work: an α fraction of the steps (plus
one catch-up at the end when its log-probs are asked for), instead of every step.

Greedy decoding (``do_sample=False``) of the mixture with 0 < α < 1 needs both distributions at every step, so
it is handed to the naive loop.

**Caches.** Each model keeps its own cache. With ``static_cache`` (default on CUDA for models that declare
``_can_compile_fullgraph``) it is a transformers ``StaticCache`` sized prompt + max_new_tokens, the attention
mask is one fixed [B, P + max_new_tokens] buffer (left padding zeroed, every response slot 1: causality hides
the slots not written yet) and positions are passed explicitly, so single-token steps have static shapes and
``cuda_graphs`` can run them through ``torch.compile`` with the model's own compile config (mode "reduce-overhead",
as HF ``generate``), one compiled entry per model. Multi-token catch-ups run eagerly on the same cache. Static caches
are kept and ``reset()`` per (model, batch, length), so CUDA-graph trees see the same addresses every batch. With
CUDA graphs the stop condition is checked every 16 steps (a host sync per step would show); steps past the point
where every row had stopped only decode padding and are dropped, so the result equals a check at every step.
If compiling/capturing or the static cache fails at run time, one warning names the switch and decoding continues
eagerly with the same result.
Shapes are bucketed so that a training run compiles and captures its decode steps in its first phase only: prompts
are left-padded to a multiple of :data:`STATIC_PROMPT_BUCKET` columns, the batch is padded with dummy rows (copies of row 0,
dropped from every result: tokens are drawn for the real rows only, so the random stream and the real rows' tokens
are those of the unpadded batch) up to a larger batch this model already decodes, else to a power of two, and the
cache length is rounded up to a multiple of :data:`STATIC_LENGTH_BUCKET`, or to a longer one this model already
decodes (up to twice as long: the extra slots are never written and causality hides them). See
:func:`_static_shape`. (Real rows' log-probs are bit-identical to the unpadded batch's wherever the matmul kernels do
not change with the row count; CPU BLAS picks another kernel below 4 rows: fp32 rounding apart there.) Compiles, captures and their seconds are counted in
:mod:`minillm.generation.compile_stats`; ``trace=`` (:class:`minillm.generation.trace.RolloutTrace`) times the loop.
On CPU, and for other models, a ``DynamicCache`` and eager forwards give the same results.
"""

from __future__ import annotations

import logging
import math
import types
import weakref
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

from . import compile_stats
from .sampling import (SampleOutput, _accepts_logits_to_keep, _cache_keyword, _check_prompts, _eos_tensor, _eval_mode,
                       _model_device, _new_cache, check_sampling_args, mixed_sample, position_ids_from_mask,
                       process_logits)
from .trace import NULL_TRACE

__all__ = ["FastSampleOutput", "fast_mixed_sample", "left_pad_to_bucket"]

# Static caches are sized (prompt width + max_new_tokens). Rounding the prompt width up to a multiple of this (extra
# left padding, masked like any other) keeps the number of distinct decode shapes small, so compiled CUDA-graph
# steps are reused across rollout batches instead of recompiled for every prompt width.
STATIC_PROMPT_BUCKET = 64
# Static cache lengths (prompt + new tokens) are rounded up to a multiple of this, so eval and rollout settings of
# slightly different lengths share a decode shape.
STATIC_LENGTH_BUCKET = 64


# Off: static decoding runs at the exact (batch, prompt + new tokens) shape (the reference the tests compare with).
SHAPE_BUCKETING = True


def batch_bucket(batch: int) -> int:
    """The batch size static decoding runs at: the next power of two (the last, smaller batch of a phase and eval
    batches then reuse the compiled steps of a full batch, at most twice the rows)."""
    return 1 << max(0, int(batch) - 1).bit_length()


def pad_rows(x: Tensor, rows: int) -> Tensor:
    """Append copies of row 0 up to ``rows`` rows: dummy rows that are real sequences (no all-masked row to turn
    into NaN), whose outputs are dropped."""
    extra = rows - x.shape[0]
    return x if extra <= 0 else torch.cat([x, x[:1].expand(extra, *x.shape[1:])], 0)


def left_pad_to_bucket(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int,
                       bucket: int = STATIC_PROMPT_BUCKET) -> tuple[Tensor, Tensor]:
    """Left-pad [B, P] prompts with masked ``pad_token_id`` columns to the next multiple of ``bucket`` columns.
    Positions come from the mask, so the models see the same sequence: only the cache shape changes."""
    extra = -input_ids.shape[1] % bucket
    if extra == 0:
        return input_ids, attention_mask
    ids = torch.cat([input_ids.new_full((input_ids.shape[0], extra), int(pad_token_id)), input_ids], dim=1)
    return ids, torch.cat([attention_mask.new_zeros((attention_mask.shape[0], extra)), attention_mask], dim=1)


@dataclass
class FastSampleOutput(SampleOutput):
    """:class:`SampleOutput` plus what the engine did. ``teacher_logprobs`` and ``mixed_logprobs`` are None when
    ``score=False`` (the teacher is then not asked to catch up at the end)."""

    teacher_steps: Tensor  # [L] bool, True where the token was drawn from the teacher (the coin came up α)
    student_forwards: int  # forward calls the student made (prefill, catch-ups, final scoring)
    teacher_forwards: int  # same for the teacher

    def to(self, device: torch.device | str) -> "FastSampleOutput":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return FastSampleOutput(**{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in moved.items()})


log = logging.getLogger("minillm.generation.engine")
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """Optional speed-ups that fail fall back to the plain path with ONE warning per cause, not one per batch."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)


# Switch names in warnings: the config key and the function argument, so either kind of caller knows what to set.
_GRAPHS_SWITCH = "rollout.cuda_graphs (fast_mixed_sample(cuda_graphs=False))"
_STATIC_SWITCH = "rollout.static_cache (fast_mixed_sample(static_cache=False))"


class _DecodeStep:
    """A model's compiled single-token step.

    Dynamo keeps its compiled entries, and counts recompiles against ``torch._dynamo.config.recompile_limit``, per
    *code object*. ``model.get_compiled_call`` compiles ``model.__call__``, whose code is shared by every model (the
    student, the teacher, the sampling copy) and every eval shape, so past the limit decoding silently fell back to
    eager. Each model gets a function with its own code object instead: its own cache entries and its own budget.
    """

    def __init__(self, model: torch.nn.Module):
        def step(*args, **kwargs):
            return model(*args, **kwargs)

        name = f"minillm_decode_step_{type(model).__name__}_{id(model):x}"
        self.code = step.__code__.replace(co_name=name, co_qualname=name)
        function = types.FunctionType(self.code, step.__globals__, name, None, step.__closure__)
        default = getattr(model, "_default_compile_config", None)
        config = default().to_dict() if default is not None else {"mode": "reduce-overhead"}
        self.call = torch.compile(function, **config)
        self.owner = weakref.ref(model)  # a deep copy of the model copies the attribute: the owner check catches it
        self.shapes: set[tuple[int, ...]] = set()  # (batch, cache length) shapes decoded through this step
        self.eager_shapes: set[tuple[int, ...]] = set()  # shapes past the recompile limit: decoded eagerly
        self.broken = False  # compiling or running it failed once: the model decodes eagerly from then on

    def compiled_entries(self) -> int:
        """Compiled graphs dynamo holds for this step (one per shape/guard set it recompiled for)."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(self.code))


def _is_recompile_error(error: Exception) -> bool:
    from torch._dynamo.exc import RecompileError

    return isinstance(error, RecompileError)


def _decode_step(model: torch.nn.Module) -> _DecodeStep:
    """The model's :class:`_DecodeStep`, built once. Kept on the model (a cycle the GC collects with it), not in a
    global map whose values, closing over the model, would keep every model alive."""
    step = model.__dict__.get("_minillm_decode_step")
    if step is None or step.owner() is not model:
        step = model.__dict__["_minillm_decode_step"] = _DecodeStep(model)
    return step


def _compiled_call(model: torch.nn.Module, shape: tuple[int, ...]):
    """The compiled step to use for a batch of this (batch, cache length) shape, or None to decode eagerly: after a
    failure, or for a shape that hit dynamo's recompile limit before (see :meth:`_LazyLM._call`)."""
    step = _decode_step(model)
    if step.broken or shape in step.eager_shapes:
        return None
    compile_stats.install()  # once per generation batch: torch._dynamo.reset() may have dropped the counter
    if shape not in step.shapes:
        step.shapes.add(shape)
        compile_stats.new_step_shape()
    return step


# Static caches are reused per (model, batch, cache length): allocating a new one per call gave its tensors new
# addresses, and CUDA-graph trees re-record a graph whenever a static input's address changes. A few shapes per model.
_STATIC_CACHES: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
_STATIC_CACHES_PER_MODEL = 6


def _static_shape(model: torch.nn.Module, rows: int, needed: int) -> tuple[int, int]:
    """(batch, cache length) a static decode of ``rows`` prompts and ``needed`` columns runs at. Reuse comes first:
    the smallest shape this model already has a static cache or compiled step for with at least ``rows`` rows and a
    length from ``needed`` (rounded up to :data:`STATIC_LENGTH_BUCKET`) to twice that (so the last, smaller batch of
    a phase and dev batches decode at the full batch's compiled shape; a decode step reads the weights once whatever
    its rows). Otherwise the batch rounded up to a power of two and the rounded length. With
    :data:`SHAPE_BUCKETING` off: exactly (rows, needed)."""
    if not SHAPE_BUCKETING:
        return rows, needed
    length = -(-int(needed) // STATIC_LENGTH_BUCKET) * STATIC_LENGTH_BUCKET
    step = model.__dict__.get("_minillm_decode_step")
    known = {key[1:] for key in _STATIC_CACHES.get(model, {})} | (set(step.shapes) if step is not None else set())
    fits = [(b * n, b, n) for b, n in known if b >= rows and length <= n <= 2 * length]
    return min(fits)[1:] if fits else (batch_bucket(rows), length)


def _static_cache(model: torch.nn.Module, key: tuple[int, ...]):
    """A reset transformers ``StaticCache`` for this model and key (role, batch, cache length), the same object on
    every call. The role (0 student, 1 teacher) keeps one model sampling against itself on two caches."""
    from transformers import StaticCache

    caches = _STATIC_CACHES.setdefault(model, OrderedDict())
    max_cache_len = key[-1]
    cache = caches.pop(key, None)
    if cache is None:
        cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    else:
        cache.reset()  # zeroes the tensors in place and rewinds the write positions; addresses stay
    caches[key] = cache  # most recently used last
    while len(caches) > _STATIC_CACHES_PER_MODEL:
        caches.popitem(last=False)
    return cache


def _drop_static_cache(model: torch.nn.Module, key: tuple[int, ...]) -> None:
    _STATIC_CACHES.get(model, {}).pop(key, None)


def _rewind_static_cache(cache, length: int) -> None:
    """Set every static layer's write position back to ``length`` tokens (after a compiled call that failed part
    way: the eager retry then rewrites the same slots with the same values)."""
    for layer in getattr(cache, "layers", ()):
        written = getattr(layer, "cumulative_length", None)
        if isinstance(written, Tensor):
            written.fill_(length)


def _output_rows(model: torch.nn.Module) -> int:
    """Vocabulary entries the model scores: its output embedding's rows (its config's vocab_size otherwise)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2 and weight.numel():
        return int(weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def _supports_static_cache(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_can_compile_fullgraph", False)) and getattr(model, "config", None) is not None


class _LazyLM:
    """One model's decoding state: its cache, how many response tokens it has consumed, the logits it last
    produced (predicting the first token it has not consumed) and the processed log-probs of the tokens so far.

    Invariant: after ``catch_up(response, t)`` the cache holds prompt + y_0..y_{t−1} and ``next_logits`` [B, V]
    (fp32) predict y_t.
    """

    def __init__(self, model: torch.nn.Module, work_device: torch.device, prompt_ids: Tensor, prompt_mask: Tensor,
                 max_new_tokens: int, static: bool, graphs: bool, warp: dict, vocab_size: int | None, role: int,
                 trace=NULL_TRACE):
        self.model = model
        self.trace, self.name = trace, ("student", "teacher")[role]
        self.vocab_size = vocab_size
        self.device = _model_device(model)
        self.work_device = work_device
        self.warp = warp
        self.rows = prompt_ids.shape[0]  # real rows; static decoding adds dummy rows up to the batch bucket
        self.prompt_len = prompt_ids.shape[1]
        needed = self.prompt_len + max_new_tokens
        batch, length = _static_shape(model, self.rows, needed) if static else (self.rows, needed)
        self.prompt_ids = pad_rows(prompt_ids.to(self.device), batch)
        mask = pad_rows(prompt_mask.to(self.device).long(), batch)
        # prompt mask followed by 1 for every response slot: slots not yet written are hidden by causality
        self.full_mask = torch.cat([mask, mask.new_ones(batch, length - self.prompt_len)], dim=1)
        self.prompt_positions = position_ids_from_mask(mask)
        self.first_position = self.prompt_positions[:, -1:] + 1  # [B, 1] position of y_0 (last column is real)
        self.cache_shape = (batch, length)
        self.static = static
        self.role = role
        self.cache = None
        if static:
            try:
                self.cache = _static_cache(model, (role, *self.cache_shape))
            except Exception as error:  # an optional speed-up: decode on a dynamic cache instead
                self._static_failed(error, "building its static cache")
        if self.cache is None:
            self.cache = _new_cache(model)
        self.cache_kw = _cache_keyword(model)
        self.keep_kw = _accepts_logits_to_keep(model)
        self.step = _compiled_call(model, self.cache_shape) if (graphs and self.static) else None
        self.fed = -1  # response tokens in the cache; −1 = not even the prompt yet
        self.next_logits: Tensor | None = None
        self.logprobs: dict[int, Tensor] = {}  # response index → [B] processed log-prob of that token
        self.forwards = 0

    def _static_failed(self, error: Exception, doing: str) -> None:
        _warn_once(f"static-{id(self.model)}",
                   f"minillm.generation.engine: {doing} failed for {type(self.model).__name__} ({type(error).__name__}: "
                   f"{error}); decoding continues on a dynamic cache, eagerly (same results, slower). Set "
                   f"{_STATIC_SWITCH} to skip the attempt.")
        _drop_static_cache(self.model, (self.role, *self.cache_shape))
        self.static, self.step, self.cache = False, None, _new_cache(self.model)

    def _call(self, input_ids: Tensor, positions: Tensor, total_len: int, keep: int):
        mask = self.full_mask if self.static else self.full_mask[:, :total_len]
        kwargs = {self.cache_kw: self.cache, "use_cache": True}
        if self.keep_kw:
            kwargs["logits_to_keep"] = keep
        if self.step is not None and input_ids.shape[1] == 1:
            from torch._dynamo.exc import FailOnRecompileLimitHit

            try:
                # Past its recompile limit dynamo would run the step eagerly without a word; make it raise instead
                with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                    mark = compile_stats.start()
                    out = self.step.call(input_ids=input_ids, attention_mask=mask, position_ids=positions, **kwargs)
                    compile_stats.charge(mark)
                    return out
            except FailOnRecompileLimitHit:  # raised before anything ran: the cache is untouched
                limit = torch._dynamo.config.recompile_limit
                _warn_once(f"recompile-limit-{id(self.model)}",
                           f"minillm.generation.engine: the compiled decode step of {type(self.model).__name__} hit "
                           f"torch._dynamo.config.recompile_limit ({limit}); batches of new (batch size, length) "
                           "shapes decode eagerly (same results, slower). Use fewer distinct batch shapes or raise "
                           "the limit.")
                self.step.eager_shapes.add(self.cache_shape)
                self.step = None
            except Exception as error:  # compiling or capturing failed: this step, and the rest, run eagerly
                if _is_recompile_error(error):  # torch._dynamo.config.error_on_recompile: a check, not a failure
                    raise
                _warn_once(f"graphs-{id(self.model)}",
                           f"minillm.generation.engine: the compiled decode step of {type(self.model).__name__} failed "
                           f"({type(error).__name__}: {error}); decoding continues eagerly (same results, slower). "
                           f"Set {_GRAPHS_SWITCH} to skip the attempt.")
                self.step.broken, self.step = True, None
                _rewind_static_cache(self.cache, total_len - input_ids.shape[1])
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **kwargs)

    def _forward(self, input_ids: Tensor, positions: Tensor, total_len: int, keep: int) -> Tensor:
        """Feed [B, S] new tokens at ``positions`` [B, S]; the cache then holds ``total_len`` columns.
        Returns the last ``keep`` logits [B, keep, V] as an fp32 copy (compiled calls reuse their output buffer)."""
        if self.static and self.fed < 0:  # the prefill allocates the static cache's tensors: it may fail there
            try:
                out = self._call(input_ids, positions, total_len, keep)
            except Exception as error:
                self._static_failed(error, "the prefill on its static cache")
                out = self._call(input_ids, positions, total_len, keep)
        else:
            out = self._call(input_ids, positions, total_len, keep)
        self.forwards += 1
        if not self.static:
            returned = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            if returned is not None:  # models may hand back a new cache object
                self.cache = returned
        logits = out.logits[:self.rows, -keep:]  # the dummy rows' logits are dropped here
        if self.vocab_size is not None:
            logits = logits[..., :self.vocab_size]
        return logits.to(device=self.work_device, dtype=torch.float32, copy=True)

    def catch_up(self, response: Tensor, t: int) -> Tensor:
        """Consume y_{fed}..y_{t−1} of ``response`` [B, ≥t] in one forward → logits [B, V] predicting y_t."""
        if self.fed == t:
            return self.next_logits
        if self.fed > t:
            raise RuntimeError(f"minillm.generation.engine: catch_up to step {t} after consuming {self.fed} tokens (the cache "
                               "cannot go back)")
        start = max(self.fed, 0)
        # contiguous: a padded batch's tokens are a fresh tensor, a full batch's a strided view of the response; the
        # compiled step guards on strides, so both must look alike or every switch recompiles
        new_tokens = pad_rows(response[:, start:t].to(self.device), self.prompt_ids.shape[0]).contiguous()
        # arange on the device: no host-to-device copy (a blocking one on CUDA) per catch-up
        new_positions = self.first_position + torch.arange(start, t, device=self.device)
        if self.fed < 0:  # first run: the prompt too; keep the logits predicting y_0..y_t
            with self.trace.span(f"{self.name}_prefill", self.prompt_len + t):
                logits = self._forward(torch.cat([self.prompt_ids, new_tokens], 1),
                                       torch.cat([self.prompt_positions, new_positions], 1), self.prompt_len + t,
                                       t + 1)
        else:  # logits predicting y_{fed+1}..y_t, after the stored ones predicting y_{fed}
            with self.trace.span(f"{self.name}_step" if t - start == 1 else f"{self.name}_catch_up", t - start):
                logits = torch.cat([self.next_logits[:, None],
                                    self._forward(new_tokens, new_positions, self.prompt_len + t, t - start)], 1)
        # The tokens this model has no log-prob for are one contiguous run: y_fed may be its own draw (stored when
        # drawn), every later one was drawn by the other model. A slice, so no index tensor is built on the host.
        first = start + 1 if start in self.logprobs else start
        if first < t:
            scores = process_logits(logits[:, first - start:t - start], **self.warp)  # [B, n, V]
            tokens = response[:, first:t].to(logits.device).unsqueeze(-1)
            values = (scores.gather(-1, tokens) - torch.logsumexp(scores, -1, keepdim=True)).squeeze(-1)
            for i, j in enumerate(range(first, t)):
                self.logprobs[j] = values[:, i]
        self.fed, self.next_logits = t, logits[:, -1]
        return self.next_logits

    def finish(self, response: Tensor, length: int) -> Tensor:
        """Processed log-probs [B, length] of y_0..y_{length−1} (one last catch-up if needed)."""
        if self.fed < length:
            logits = self.catch_up(response, length - 1)
            if length - 1 not in self.logprobs:
                scores = process_logits(logits, **self.warp)
                token = response[:, length - 1].to(scores.device).unsqueeze(-1)
                self.logprobs[length - 1] = (scores.gather(-1, token)
                                             - torch.logsumexp(scores, -1, keepdim=True))[:, 0]
        # else: the sparse stop check decoded past the last kept column; every kept token was consumed, so its
        # log-prob is already known (and the cache cannot go back to catch up to an earlier step)
        return torch.stack([self.logprobs[j] for j in range(length)], dim=1)


def _sampling_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """The generator ``torch.multinomial`` draws from: the given one, else the device's default (None if unknown)."""
    if generator is not None:
        return generator
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return None


def check_engine_inputs(where: str, student: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                        generator: torch.Generator | None, warp: dict) -> torch.device:
    """The checks every sampling engine makes before any forward: left-padded prompts, valid warper settings, a
    generator on the student's device type. Returns the student's device."""
    _check_prompts(input_ids, attention_mask, where.rsplit(".", 1)[-1])
    process_logits(torch.zeros(1, 1), **warp)
    device = _model_device(student)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"{where}: the generator lives on {generator.device} but sampling runs on the student's "
                         f"device {device}; create torch.Generator(device={str(device)!r})")
    return device


@torch.no_grad()
def fast_mixed_sample(student: torch.nn.Module, teacher: torch.nn.Module | None, input_ids: Tensor,
                      attention_mask: Tensor, *, max_new_tokens: int, alpha: float = 0.2, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None,
                      pad_token_id: int | None, generator: torch.Generator | None = None, do_sample: bool = True,
                      score: bool = True, static_cache: bool | None = None, cuda_graphs: bool | None = None,
                      vocab_size: int | None = None, trace=NULL_TRACE) -> SampleOutput:
    """Draw y ~ p̃ = (1−α)·q + α·p exactly, running each model only on the steps its coin side comes up.

    Arguments and result as :func:`minillm.generation.sampling.mixed_sample` (left-padded [B, P] prompts; rows stop at
    their first EOS and are padded after it; log-probs under the processed distributions, 0 where masked).
    ``score=False`` skips the teacher's final catch-up: ``teacher_logprobs``/``mixed_logprobs`` are then None
    (the trainer re-scores with teacher forcing anyway). ``static_cache``/``cuda_graphs``: None = on for CUDA
    models that support them. ``vocab_size`` cuts both models' logits to the tokenizer's entries
    (:class:`minillm.models.VocabAlignment`), so padded embedding rows are never drawn. Returns a
    :class:`FastSampleOutput`. ``trace``: a :class:`minillm.generation.trace.RolloutTrace` to time the loop's parts.
    """
    pad_token_id = check_sampling_args("minillm.generation.engine.fast_mixed_sample", alpha=alpha, teacher=teacher,
                                       max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                       pad_token_id=pad_token_id)
    if not do_sample and 0.0 < alpha < 1.0:  # argmax of the mixture needs both models at every step
        return mixed_sample(student, teacher, input_ids, attention_mask, max_new_tokens=max_new_tokens, alpha=alpha,
                            temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id, generator=generator, do_sample=False, vocab_size=vocab_size)
    warp = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    device = check_engine_inputs("minillm.generation.engine.fast_mixed_sample", student, input_ids, attention_mask, generator,
                                 warp)
    use_teacher = alpha > 0.0
    models = [student] + ([teacher] if use_teacher else [])
    if static_cache is None:
        static_cache = all(_model_device(m).type == "cuda" and _supports_static_cache(m) for m in models)
    if cuda_graphs is None:
        cuda_graphs = static_cache and all(_model_device(m).type == "cuda" for m in models)
    if cuda_graphs and not static_cache:
        raise ValueError("minillm.generation.engine.fast_mixed_sample: cuda_graphs=True needs static_cache=True (CUDA graphs "
                         "replay fixed shapes)")
    if use_teacher and vocab_size is None and _output_rows(student) != _output_rows(teacher):
        raise ValueError(f"minillm.generation.engine: the student has {_output_rows(student)} output rows and the teacher "
                         f"{_output_rows(teacher)}; teacher-mixed sampling needs one shared vocabulary (resize one "
                         "model's embeddings to the other's size)")
    length = int(max_new_tokens)
    ids, prompt_mask = input_ids.to(device), attention_mask.to(device)
    batch = ids.shape[0]
    # Every coin is drawn before any token, so none can depend on the tokens: this is what makes p̃ exact.
    # α = 0 and α = 1 draw no coin, so the generator then follows the naive loop's stream token for token.
    if 0.0 < alpha < 1.0:
        coins = torch.rand(length, generator=generator, device=device) < alpha  # [L] bool
    else:
        coins = torch.full((length,), alpha == 1.0, dtype=torch.bool, device=device)
    with trace.span("host_sync", host=True):
        teacher_turn = coins.tolist()  # the engine's one host sync for the coins
    eos = _eos_tensor(eos_token_id, device)
    pad = torch.full((batch,), int(pad_token_id), dtype=torch.long, device=device)
    response = torch.full((batch, length), int(pad_token_id), dtype=torch.long, device=device)
    valid = torch.zeros((batch, length), dtype=torch.bool, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    # CUDA graphs make a step cheap enough that a host sync per step shows; check the stop condition less often
    check_every = 16 if cuda_graphs else 1
    steps = length
    # Draws made past the stop would shift the random stream of every later call (the next eval batch samples other
    # tokens than with a check at every step): keep the states of the steps since the last check to rewind to.
    rng = _sampling_generator(generator, device) if (do_sample and check_every > 1) else None
    rng_states: dict[int, Tensor] = {}

    model_ids, model_mask = left_pad_to_bucket(ids, prompt_mask, pad_token_id, STATIC_PROMPT_BUCKET) if static_cache else (ids, prompt_mask)
    with _eval_mode(*models):
        s_lm = _LazyLM(student, device, model_ids, model_mask, length, static_cache, cuda_graphs, warp, vocab_size,
                       role=0, trace=trace)
        t_lm = _LazyLM(teacher, device, model_ids, model_mask, length, static_cache, cuda_graphs, warp, vocab_size,
                       role=1, trace=trace) if use_teacher else None
        for t in range(length):
            if rng is not None:
                rng_states[t] = rng.get_state()  # host-side state (seed, offset on CUDA): no device sync
            lm = t_lm if teacher_turn[t] else s_lm
            logits = lm.catch_up(response, t)  # [B, V] fp32, predicting y_t
            with trace.span("sample"):
                logp = torch.log_softmax(process_logits(logits, **warp), dim=-1)
                token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1) if do_sample \
                    else logp.argmax(dim=-1)
                alive = ~done
                token = torch.where(alive, token, pad)
                lm.logprobs[t] = logp.gather(1, token[:, None]).squeeze(1)
                response[:, t] = token
                valid[:, t] = alive
                done = done | torch.isin(token, eos)
            if (t + 1) % check_every == 0:
                with trace.span("host_sync", host=True):
                    stop = bool(done.all())
                if stop:
                    steps = t + 1
                    break
                rng_states.clear()  # the stop cannot lie before this step
        # columns after the step where every row had stopped are all padding: drop them (as the naive loop stops)
        with trace.span("host_sync", host=True):
            steps = max(1, int(valid[:, :steps].any(0).sum()))
        if steps in rng_states:  # sparse checks drew past the stop: leave the stream where a dense check leaves it
            rng.set_state(rng_states[steps])
        s_lp = s_lm.finish(response, steps)
        t_lp = t_lm.finish(response, steps) if (t_lm is not None and score) else None

    keep = valid[:, :steps]
    zero = torch.zeros_like(s_lp)
    student_lp = torch.where(keep, s_lp, zero)
    teacher_lp = mixed_lp = None
    if t_lp is not None:
        log_w_student = math.log1p(-alpha) if alpha < 1.0 else -math.inf
        mixed = torch.logaddexp(log_w_student + s_lp, math.log(alpha) + t_lp)
        teacher_lp, mixed_lp = torch.where(keep, t_lp, zero), torch.where(keep, mixed, zero)
    elif not use_teacher:
        mixed_lp = student_lp
    return FastSampleOutput(
        prompt_ids=ids, prompt_mask=prompt_mask, response_ids=response[:, :steps].clone(),
        response_mask=keep.float(), student_logprobs=student_lp, teacher_logprobs=teacher_lp,
        mixed_logprobs=mixed_lp, teacher_steps=coins[:steps].clone(), student_forwards=s_lm.forwards,
        teacher_forwards=t_lm.forwards if t_lm is not None else 0)
