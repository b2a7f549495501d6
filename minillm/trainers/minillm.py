"""MiniLLMTrainer: reverse-KL distillation optimised by policy gradient (Gu et al., ICLR 2024).

One *phase* of training:

1. **rollout**: sample ``rollout.num_rollouts`` responses (this rank's share) from the teacher-mixed
   distribution p̃ = (1−α)·q_θ + α·p with the current student, in eval mode (no dropout);
2. **score**: teacher and old-student log-probs, importance weights w = q_old/p̃, rewards
   r_t = (log p − log q_old)/scale, long-range returns (``minillm.generation.rollout.score_samples``);
3. **learn**: ``minillm.ppo_epochs`` passes over the shuffled buffer in micro-batches; each micro-step adds
   the PPO-clipped long-range term (advantages whitened per micro-batch, statistics all-reduced over ranks),
   the exact single-step KL over the vocabulary, and ``ptx_coef`` × the pre-training loss on a corpus batch;
4. **evaluate / save** at optimizer-step intervals.

Total loss (reference): L = L_pg + L_single + ptx_coef·L_PT. Every ablation is a config switch (see
``MiniLLMConfig``). Training stops at ``train.max_steps`` or after ``train.epochs`` passes over the prompts.

Exact resume: the checkpoint holds the step, the phase number, the inner position (PPO epoch and micro-batch),
the rollout buffer, both data cursors and every RNG; the shuffling permutation of a PPO epoch is a pure function
of (seed, rank, phase, epoch), so nothing else is needed.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..losses import chunked as chunked_losses
from .. import losses
from ..losses.heads import chunked_head_matches, global_chunk_count, hidden_and_head, lm_head, response_hidden
from ..config import RunConfig, to_dict
from ..data import ResumableSampler
from ..generation.compile_stats import CompileLog
from ..generation.dispatch import sample_rollouts
from ..evaluation import rouge_l
from ..generation.rollout import Rollout, pad_responses, response_logits, score_samples
from ..generation.sampling import teacher_forced_logprobs
from ..tracking import MetricsLogger, get_logger
from .ranking import duplicate_prompts, pair_permutation, ranking_micro_batch_loss
from .common import (BestTracker, MetricWindow, NanGuard, PhaseTimer, evaluate_and_select, export_model,
                     guarded_micro_step, load_checkpoint, mean_over_ranks, save_checkpoint,
                     stop_early, stop_gracefully, to_device, train_under_stop_control)
from .preemption import RolloutInterrupted, measure_save, phase_start_state, restore_phase_start
from ..routing import DevPerTeacher, build_router, dev_routes, pretrain_teacher
from .rollout_stats import disable_dropout, rollout_statistics, rollout_totals  # noqa: F401 (also imported from here)
from .served import (ScoringPipeline, TeacherServerUnavailable, learn_or_stop, prefetch_pt_batches,
                     served_timings)

log = get_logger()


class MiniLLMTrainer:
    """Train ``student`` to minimise KL(q_θ‖p) against the frozen ``teacher``.

    ``data`` is a :class:`minillm.data.InstructionData`; its training prompts are sampled, its dev prompts
    evaluated. The pre-training corpus (``data.pretrain``) is loaded when ``minillm.ptx_coef > 0``; ``corpus``
    passes one in instead (any dataset of ``{input_ids, labels, index}`` items like
    :class:`minillm.data.PackedCorpus`, e.g. built in a notebook or a benchmark).
    """

    def __init__(self, config: RunConfig, student, tokenizer, data, strategy, teacher, alignment=None, corpus=None):
        self.cfg = config
        self.tokenizer = tokenizer
        self.data = data
        self.strategy = strategy
        self.alignment = alignment
        self.output_dir = Path(config.output_dir)
        t, r, m = config.train, config.rollout, config.minillm
        self.rollouts_per_rank = r.num_rollouts // strategy.world_size
        self.micro_per_epoch = self.rollouts_per_rank // t.micro_batch_size
        self.steps_per_phase = m.ppo_epochs * self.micro_per_epoch // t.gradient_accumulation_steps

        self.prompt_sampler = ResumableSampler(len(data.train_prompts), seed=config.seed, rank=strategy.rank,
                                               world_size=strategy.world_size, shuffle=True, drop_last=True)
        prompts_per_epoch = len(self.prompt_sampler)
        if prompts_per_epoch < r.chunk_size:
            from ..config import ConfigError

            raise ConfigError(f"{len(data.train_prompts)} training prompts are fewer than one generation batch per "
                             f"rank (rollout.chunk_size={r.chunk_size}); lower it")
        # Stop at max_steps or after `epochs` passes over the prompts, whichever comes first (the reference).
        phases_per_epoch = max(1, prompts_per_epoch // self.rollouts_per_rank)
        by_epochs = t.epochs * phases_per_epoch * self.steps_per_phase if t.epochs > 0 else None
        self.total_steps = min(s for s in (t.max_steps if t.max_steps > 0 else None, by_epochs) if s is not None)

        # The teacher's hidden states over a rollout, kept from scoring for every PPO epoch's single-step term.
        self._reuse_teacher = m.reuse_teacher and m.single_step and m.chunked_losses and m.objective in ("pg", "opd")
        self.use_pt = m.ptx_coef > 0 and (config.data.pretrain is not None or corpus is not None)
        if m.ptx_coef > 0 and not self.use_pt:
            log.warning("minillm.ptx_coef=%s but data.pretrain is not set: the PT loss is off", m.ptx_coef)
        if self.use_pt:
            from ..data import load_or_pack_corpus

            self.corpus = corpus if corpus is not None else load_or_pack_corpus(config.data, tokenizer)
            self.pt_sampler = ResumableSampler(len(self.corpus), seed=config.seed + 1, rank=strategy.rank,
                                               world_size=strategy.world_size, shuffle=True, drop_last=True)
        # The teacher's distributions on the corpus, computed offline (minillm-teacher-cache): no teacher forward on
        # pre-training batches. None: the teacher runs on each PT micro-batch.
        self.pt_cache = None
        if self.use_pt and m.pt_teacher_cache is not None:
            from ..data.teacher_cache import TeacherTopKCache

            self.pt_cache = TeacherTopKCache(m.pt_teacher_cache)
            pt_model, pt_path, _ = pretrain_teacher(config, teacher)
            rows = alignment.vocab_size if alignment is not None else pt_model.get_output_embeddings().weight.shape[0]
            for warning in self.pt_cache.check(self.corpus, rows, teacher_path=pt_path):
                log.warning(warning)

        from ..optim import build_optimizer, build_scheduler

        optimizer = build_optimizer(student, config.optim)
        scheduler = build_scheduler(optimizer, config.optim, self.total_steps)
        self.student = strategy.prepare_student(student, optimizer, scheduler)
        self._prompt_set, self.router = data.train_prompts, None
        if isinstance(teacher, dict):  # `teachers:`: each prepared once (sharded under ZeRO-3), one per phase
            teachers = {name: strategy.prepare_teacher(model) for name, model in teacher.items()}
            self.router = build_router(config, data, teachers, strategy)
            self.pt_teacher = teachers[pretrain_teacher(config, teacher)[2]]
            self.phase = 0
            self._route_phase()
        else:
            self.teacher = self.pt_teacher = strategy.prepare_teacher(teacher)
        self._set_student_mode()
        # A family whose logits are post-processed in a way the chunked head does not reproduce: plain losses
        if m.chunked_losses and not all(
                chunked_head_matches(x, "minillm.chunked_losses", trim=self._trim, autocast=strategy.autocast,
                                     device=strategy.device) for x in (self.student, *self._all_teachers())):
            m.chunked_losses = False
            self._reuse_teacher = False

        self.step = 0
        self.phase = 0
        self.ppo_epoch = 0
        self.micro_index = 0
        self.buffer: Rollout | None = None
        self.nan_guard = NanGuard(strategy, t.max_nan_skips)
        self.best = BestTracker(t.select_best_by)
        self.window = MetricWindow()
        self.timer = PhaseTimer()
        self.compile_log = CompileLog()  # time/compile and engine/* counts of the decode steps (flat after phase 1)
        self.metrics = MetricsLogger(self.output_dir, config.logging, strategy.is_main,
                                     run_name=self.output_dir.name, config=to_dict(config))
        self._prompt_iter = None
        self._pt_iter = None
        self._phase_stats: dict[str, float] = {}

    # ------------------------------------------------------------------------------ helpers
    def _set_student_mode(self) -> None:
        """No dropout during RL. HF only checkpoints activations in train mode, so with gradient checkpointing
        the student stays in train mode with every dropout and layer-drop rate set to 0 instead of eval mode."""
        module = self.strategy.unwrap(self.student)
        if self.cfg.student.gradient_checkpointing:
            disable_dropout(module)
            module.train()
        else:
            module.eval()

    def _trim(self, logits: torch.Tensor) -> torch.Tensor:
        return self.alignment.trim(logits) if self.alignment is not None else logits

    def _sample(self, student, teacher, prompt_ids, prompt_mask, **kwargs):
        """Sampling through ``rollout.engine``. The fast engine skips the teacher's final scoring catch-up
        (``score_samples`` re-scores) and uses static caches + CUDA graphs on CUDA unless ZeRO-3 shards a model."""
        r = self.cfg.rollout
        vocab = self.alignment.vocab_size if self.alignment is not None else None  # never draw padded rows
        zero3 = getattr(self.strategy, "is_zero3", lambda model: False)
        graphs = r.cuda_graphs and not any(zero3(x) for x in (self.student, self.teacher) if x is not None)
        return sample_rollouts(r.engine, student, teacher, prompt_ids, prompt_mask, score=False, vocab_size=vocab,
                               static_cache=None if graphs else False, cuda_graphs=None if graphs else False,
                               draft_tokens=r.draft_tokens, **kwargs)

    def _batches(self, dataset, sampler, batch_size, collate):
        while True:
            loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                                drop_last=True, num_workers=0)
            for batch in loader:
                yield batch
            sampler.set_epoch(sampler.epoch + 1)

    def _next_prompts(self) -> dict[str, Any]:
        ranking = self.cfg.minillm.objective == "ranking"  # two samples per prompt: half the prompts, each twice
        if self._prompt_iter is None:
            size = self.cfg.rollout.chunk_size // 2 if ranking else self.cfg.rollout.chunk_size
            self._prompt_iter = self._batches(self._prompt_set, self.prompt_sampler, size,
                                              self.data.prompt_collator)
        return duplicate_prompts(next(self._prompt_iter)) if ranking else next(self._prompt_iter)

    def _all_teachers(self) -> list:
        return [self.teacher] if self.router is None else self.router.models

    def _route_phase(self) -> None:
        """Multi-teacher (minillm.routing): point the teacher, prompt subset and cursor at this phase's teacher."""
        k = self.router.teacher_of_phase(self.phase) if self.router is not None else None
        if k is not None and getattr(self, "_routed", None) != k:
            self._routed, self.teacher, self.prompt_sampler = k, self.router.models[k], self.router.samplers[k]
            self._prompt_set, self._prompt_iter = self.router.prompt_set(self.data.train_prompts, k), None

    def _next_pt_batch(self) -> dict[str, torch.Tensor]:
        if self._pt_iter is None:
            size = self.cfg.minillm.pt_micro_batch_size
            size = size if size > 0 else self.cfg.train.micro_batch_size
            self._pt_iter = self._batches(self.corpus, self.pt_sampler, size, None)
        return next(self._pt_iter)

    # ------------------------------------------------------------------------------ phases
    @torch.no_grad()
    def rollout_and_score(self) -> Rollout:
        """Sample this rank's share of the phase's rollouts from p̃ and score them."""
        cfg, strategy, r, m = self.cfg, self.strategy, self.cfg.rollout, self.cfg.minillm
        self._route_phase()
        pipeline = ScoringPipeline(self.teacher)  # a served teacher scores chunk k while chunk k+1 is generated
        stats = {"tokens": 0.0, "sample_time": 0.0, "score_time": 0.0}
        generator = torch.Generator(device=strategy.device)
        generator.manual_seed(cfg.seed * 1_000_003 + self.phase * 1009 + strategy.rank)
        collected = 0
        stopper = getattr(self, "stopper", None)  # set by train(): a stop request ends a phase between batches
        while collected < self.rollouts_per_rank:
            if collected and stopper is not None and stopper.should_stop(boundary=False):
                raise RolloutInterrupted(stopper.reason)
            batch = self._next_prompts()
            take = min(self.rollouts_per_rank - collected, batch["input_ids"].shape[0])
            prompt_ids = batch["input_ids"][:take].to(strategy.device)
            prompt_mask = batch["attention_mask"][:take].to(strategy.device)
            index = torch.as_tensor(batch["index"][:take], device=strategy.device)
            mixing = r.teacher_mix_alpha > 0
            with self.timer("rollout"), strategy.sampling_model(self.student) as s, \
                    (strategy.gathered(self.teacher) if mixing else contextlib.nullcontext()) as t, strategy.autocast():
                sample = self._sample(s, t if mixing else None, prompt_ids, prompt_mask,
                                      max_new_tokens=r.max_new_tokens, alpha=r.teacher_mix_alpha,
                                      temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                      eos_token_id=self.tokenizer.eos_token_id,
                                      pad_token_id=self.tokenizer.pad_token_id, generator=generator,
                                      do_sample=r.do_sample)
            response_ids, response_mask = pad_responses(sample.response_ids, sample.response_mask,
                                                        r.max_new_tokens, self.tokenizer.pad_token_id)
            per_teacher = self.timer(f"score/{self.router.names[self._routed]}") if self.router is not None \
                else contextlib.nullcontext()  # time/score/<name>: scoring time of each routed teacher
            chunk = dict(
                student=self.student, teacher=self.teacher, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                response_ids=response_ids, response_mask=response_mask, prompt_index=index,
                alpha=r.teacher_mix_alpha, temperature=r.temperature, **self._return_settings(),
                trim=self._trim, autocast=strategy.autocast,
                chunk_size=m.loss_chunk_size if m.chunked_losses else None,
                num_chunks=global_chunk_count(response_mask, m.loss_chunk_size, strategy)
                if m.chunked_losses else None, keep_teacher_hidden=self._reuse_teacher,
                reward_teacher_temperature=1.0 if m.reward_teacher_temperature == "one" else None)
            pipeline.push(functools.partial(self._score_chunk, per_teacher, **chunk), prompt_ids, prompt_mask,
                          response_ids)
            stats["tokens"] += float(response_mask.sum() + prompt_mask.sum())
            collected += take
        buffer = Rollout.cat(pipeline.drain())
        self._phase_stats = self._rollout_stats(buffer, stats["tokens"])
        return buffer

    def _score_chunk(self, per_teacher, **kwargs) -> Rollout:  # timed as time/score (and time/score/<name>)
        with self.timer("score"), per_teacher:
            return score_samples(**kwargs)

    def _rollout_stats(self, buffer: Rollout, tokens: float) -> dict[str, float]:
        """Token means over the whole phase on all ranks (sums and counts all-reduced, not means of means)."""
        totals = rollout_totals(buffer, tokens).to(self.strategy.device)
        self.strategy.all_reduce(totals, "sum")
        stats = rollout_statistics(totals)
        if self.router is not None:  # teacher/<name>/* metrics and the routed-token counters
            stats.update(self.router.record_phase(self._routed, stats, float(totals[-3]), float(totals[-1])))
        return stats

    def _return_settings(self) -> dict[str, Any]:
        """How scoring turns the per-token log-ratios into returns. MiniLLM: scaled, clipped rewards and its
        long-range return. OPD: the log-ratio itself (scale 1, no clip), discounted by opd_gamma (0: none)."""
        m = self.cfg.minillm
        if m.objective == "opd":
            return dict(reward_scale=1.0, reward_clip=None, gamma=m.opd_gamma, length_norm=m.opd_length_norm,
                        include_current=True)
        return dict(reward_scale=m.reward_scale, reward_clip=m.reward_clip, gamma=m.gamma, length_norm=m.length_norm,
                    include_current=m.include_current)

    def _clip_ratio(self) -> float | None:
        """The PPO clip range; None (no clipping) for OPD with minillm.opd_clip=false."""
        m = self.cfg.minillm
        return None if (m.objective == "opd" and not m.opd_clip) else m.clip_ratio

    def micro_batch_loss(self, mb: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """L_pg + L_single + ptx_coef·L_PT for one micro-batch of the rollout buffer."""
        strategy, m = self.strategy, self.cfg.minillm
        prefetch_pt_batches(self)  # a served teacher scores the PT batch(es) while the policy terms run
        if m.objective == "ranking":  # the paper's ranking alternative (minillm.trainers.ranking)
            return ranking_micro_batch_loss(self, mb)
        mask = mb.response_mask
        if m.whiten == "none" or m.objective == "opd":  # OPD's advantage is the log-ratio itself, never whitened
            advantages = mb.returns
        else:
            reduce = (lambda x: strategy.all_reduce(x, "sum")) if strategy.world_size > 1 else None
            advantages = losses.whiten(mb.returns, mask if m.whiten == "masked" else None, all_reduce=reduce)
        # minillm.long_range=false: single-step word-level reverse KL only (pg_loss is still logged, not optimised)
        if m.chunked_losses:
            loss, parts = self._chunked_policy_terms(mb, advantages)
        else:
            loss, parts = self._plain_policy_terms(mb, advantages)
        if self.use_pt:
            pt_batch = to_device(self._next_pt_batch(), strategy.device)
            if m.chunked_losses:
                pt = self._chunked_pt_loss(pt_batch, m.loss_chunk_size)
            else:
                with strategy.autocast():
                    pt_logits = self.student(input_ids=pt_batch["input_ids"]).logits.float()
                with torch.no_grad():
                    if self.pt_cache is not None:  # log-probs are logits of the same distribution
                        pt_t_logits = self.pt_cache.dense(pt_batch["index"], device=strategy.device)
                    elif m.pt_kd_ratio > 0:
                        pt_t_logits = self._trim(self.pt_teacher(input_ids=pt_batch["input_ids"]).logits.float())
                    else:
                        pt_t_logits = None
                pt = losses.pt_loss(self._trim(pt_logits), pt_batch["labels"], pt_t_logits, kd_ratio=m.pt_kd_ratio)
            loss = loss + m.ptx_coef * pt
            parts["pt_loss"] = float(pt.detach())
        parts["loss"] = float(loss.detach())
        return loss, parts

    def _plain_policy_terms(self, mb: Rollout, advantages: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The PPO term and the single-step KL from full [B, L, V] logits (minillm.chunked_losses=false)."""
        strategy, m, r = self.strategy, self.cfg.minillm, self.cfg.rollout
        mask = mb.response_mask
        logits = self._trim(response_logits(self.student, mb.prompt_ids, mb.prompt_mask, mb.response_ids,
                                            strategy.autocast))
        logprobs = losses.token_logprobs(logits, mb.response_ids, r.temperature) * mask
        pg = losses.ppo_clip_loss(logprobs, mb.old_logprobs, advantages, mask, weights=mb.weights,
                                  clip_ratio=self._clip_ratio())
        with torch.no_grad():
            ratio = torch.exp((logprobs - mb.old_logprobs) * mask) * mb.weights
            clip = self._clip_ratio()
            clipped = ((ratio - 1).abs() > clip).float() if clip is not None else torch.zeros_like(ratio)
        parts = {"pg_loss": float(pg.detach()), "clip_fraction": float(losses.masked_mean(clipped, mask))}
        loss = pg if m.long_range else torch.zeros((), dtype=pg.dtype, device=pg.device)
        if m.single_step:
            with torch.no_grad():
                t_logits = self._trim(response_logits(self.teacher, mb.prompt_ids, mb.prompt_mask, mb.response_ids,
                                                      strategy.autocast))
            single = losses.single_step_kl(logits, t_logits, mask, temperature=r.temperature,
                                           weights=mb.weights if m.single_step_weighted else None)
            del t_logits
            loss = loss + single
            parts["single_step_kl"] = float(single.detach())
        return loss, parts

    def _chunked_policy_terms(self, mb: Rollout, advantages: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """`_plain_policy_terms` from hidden states + LM heads in one pass over the student's head, ``loss_chunk_size``
        positions at a time: no [B, L, V] fp32 logits of either model (chunked_losses.chunked_policy_loss)."""
        strategy, m, r = self.strategy, self.cfg.minillm, self.cfg.rollout
        mask, chunk = mb.response_mask, m.loss_chunk_size
        hidden, head = response_hidden(self.student, mb.prompt_ids, mb.prompt_mask, mb.response_ids,
                                       trim=self._trim, autocast=strategy.autocast)
        teacher = {}
        if m.single_step and mb.has_teacher_hidden:  # kept from scoring: fixed for the phase
            teacher = dict(teacher_hidden=mb.teacher_hidden,
                           teacher_head=lm_head(self.teacher, trim=self._trim, autocast=strategy.autocast))
        elif m.single_step:
            with torch.no_grad():
                t_hidden, t_head = response_hidden(self.teacher, mb.prompt_ids, mb.prompt_mask, mb.response_ids,
                                                   trim=self._trim, autocast=strategy.autocast)
            teacher = dict(teacher_hidden=t_hidden, teacher_head=t_head)
        terms = chunked_losses.chunked_policy_loss(
            hidden, head, mb.response_ids, mask, old_logprobs=mb.old_logprobs, advantages=advantages,
            weights=mb.weights, clip_ratio=self._clip_ratio(), temperature=r.temperature,
            pg_coef=1.0 if m.long_range else 0.0, kl_weighted=m.single_step_weighted, chunk_size=chunk,
            num_chunks=global_chunk_count(mask, chunk, strategy), **teacher)
        parts = {"pg_loss": float(terms.pg_loss), "clip_fraction": float(terms.clip_fraction)}
        if terms.single_step_kl is not None:
            parts["single_step_kl"] = float(terms.single_step_kl)
        return terms.loss, parts

    def _chunked_pt_loss(self, pt_batch: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
        """The PT loss from hidden states + LM heads, ``chunk`` positions at a time (equals ``losses.pt_loss``)."""
        strategy, m = self.strategy, self.cfg.minillm
        hidden, head = hidden_and_head(self.student, pt_batch["input_ids"], trim=self._trim, autocast=strategy.autocast)
        t_hidden = t_head = t_logprobs = None
        if self.pt_cache is not None:  # top-k rows on the CPU; each chunk's move to the device and expand there
            t_logprobs = self.pt_cache.topk(pt_batch["index"])
        elif m.pt_kd_ratio > 0:
            with torch.no_grad():
                t_hidden, t_head = hidden_and_head(self.pt_teacher, pt_batch["input_ids"], trim=self._trim,
                                                   autocast=strategy.autocast)
        labels = pt_batch["labels"]
        return chunked_losses.chunked_pt_loss(hidden, head, labels, teacher_hidden=t_hidden, teacher_head=t_head,
                                      teacher_logprobs=t_logprobs, kd_ratio=m.pt_kd_ratio, chunk_size=chunk,
                                      num_chunks=global_chunk_count(labels != losses.IGNORE_INDEX, chunk, strategy))

    def _permutation(self, n: int) -> torch.Tensor:
        # a CPU stream: the same permutation whatever the device, so exact resume does not depend on it
        g = torch.Generator(device="cpu")
        g.manual_seed(self.cfg.seed * 7919 + self.strategy.rank * 104729 + self.phase * 1_000_003 + self.ppo_epoch)
        if self.cfg.minillm.objective == "ranking":  # keep each prompt's two samples in one micro-batch
            return pair_permutation(n, g)
        return torch.randperm(n, generator=g, device="cpu")

    # ------------------------------------------------------------------------------ loop
    def train(self, resume_from: str | Path | None = None) -> dict[str, Any]:
        """Train to the end, or until a stop signal / ``train.max_time``: see :func:`train_under_stop_control`."""
        return train_under_stop_control(self, resume_from)

    def _train(self, resume_from: str | Path | None = None) -> dict[str, Any]:
        cfg, strategy, t = self.cfg, self.strategy, self.cfg.train
        if resume_from is not None:
            self._resume(Path(resume_from))
        elif t.eval_at_start:
            self._evaluate_and_select()
        eval_every = t.eval_interval if t.eval_interval >= 0 else self.steps_per_phase * 10
        save_every = t.save_interval if t.save_interval >= 0 else self.steps_per_phase * 10
        bar = None
        if strategy.is_main and cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="minillm", dynamic_ncols=True)
        while self.step < self.total_steps:
            if self.buffer is None:
                self._route_phase()
                start = phase_start_state(self.prompt_sampler)
                try:
                    self.buffer = self.rollout_and_score()
                except (RolloutInterrupted, TeacherServerUnavailable) as stop:  # a signal, or teacher.server down
                    # a signal between generation batches (a phase's sampling can take minutes): back to the
                    # state at the phase start, which is the position the checkpoint records
                    restore_phase_start(self.prompt_sampler, start)
                    self._prompt_iter = None
                    return stop_gracefully(self, bar, str(stop))
                self.ppo_epoch, self.micro_index = 0, 0
            perm = self._permutation(len(self.buffer))
            while self.micro_index < self.micro_per_epoch and self.step < self.total_steps:
                result = learn_or_stop(self, perm)  # teacher.server down: checkpointed, stopped (a dict)
                if isinstance(result, dict):
                    return result
                if not result.stepped:
                    continue
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.logging.log_interval == 0 or self.step == self.total_steps:
                    self._log(result.grad_norm)
                if eval_every and (self.step % eval_every == 0 or self.step == self.total_steps):
                    self._evaluate_and_select()
                if save_every and self.step % save_every == 0 and self.step < self.total_steps:
                    self.save()
                if self.step == cfg.train.stop_at_step and self.step < self.total_steps:
                    return stop_early(self, bar)
                if self.step < self.total_steps and self.stopper.should_stop():

                    return stop_gracefully(self, bar, self.stopper.reason)
            if self.micro_index >= self.micro_per_epoch:
                self._end_ppo_epoch()
        if bar is not None:
            bar.close()
        self.save()
        export_model(self.output_dir / "final", strategy, self.student, self.tokenizer)
        self.metrics.close()
        return {"step": self.step, "phases": self.phase, "best": self.best.best, "best_step": self.best.best_step,
                "nan_skips": self.nan_guard.skipped}

    def learn_micro_step(self, perm: torch.Tensor):
        """Micro-step ``micro_index`` of the current PPO epoch (``perm``: the epoch's order of the buffer), timed as
        "learn"; counts the optimizer step when the strategy took one. Returns the strategy's StepResult."""
        size = self.cfg.train.micro_batch_size
        idx = perm[self.micro_index * size:(self.micro_index + 1) * size]
        mb = self.buffer.select(idx).to(self.strategy.device)
        with self.timer("learn"):
            loss, parts = self.micro_batch_loss(mb)
            result = guarded_micro_step(self, loss, parts)
        self.micro_index += 1
        if result.stepped:
            self.step += 1
        return result

    def _end_ppo_epoch(self) -> None:
        self.micro_index = 0
        self.ppo_epoch += 1
        if self.ppo_epoch >= self.cfg.minillm.ppo_epochs:
            self.buffer, self.ppo_epoch = None, 0
            self.phase += 1

    def run_phase(self) -> dict[str, float]:
        """One whole phase, as :meth:`train` runs it but without logging, evaluation or checkpoints (benchmarks,
        notebooks): rollout and score, then every PPO epoch's micro-steps. Returns the phase's rollout statistics
        and its ``time/rollout``, ``time/score`` and ``time/learn`` seconds."""
        if self.buffer is not None or self.micro_index or self.ppo_epoch:
            raise RuntimeError("MiniLLMTrainer.run_phase: a phase is in progress (resumed or interrupted train()); "
                               "finish it with train() first")
        self.timer.pop()
        self._route_phase()
        self.buffer = self.rollout_and_score()
        while self.buffer is not None:
            perm = self._permutation(len(self.buffer))
            while self.micro_index < self.micro_per_epoch:
                self.learn_micro_step(perm)
            self._end_ppo_epoch()
        self.window.pop()
        return {**self._phase_stats, **self.timer.pop(), **served_timings(self.pt_teacher)}

    def _log(self, grad_norm: float | None) -> None:
        values = mean_over_ranks(self.strategy, self.window.pop(), self.strategy.device)
        values.update(self._phase_stats)  # already global
        timing = self.timer.pop()
        values.update(timing)
        values.update(served_timings(self.pt_teacher))  # time/teacher_wait, teacher/hidden_fraction (served)
        values.update(self.compile_log.pop())
        tokens = self._phase_stats.get("rollout/tokens", 0.0)
        if timing.get("time/rollout"):
            values["rollout/tokens_per_s"] = tokens / (timing["time/rollout"] + timing.get("time/score", 0.0))
        values.update({"train/lr": self.strategy.current_lr(), "train/grad_norm": grad_norm,
                       "train/phase": self.phase, "train/prompt_epoch": self.prompt_sampler.epoch,
                       "train/nan_skips": self.nan_guard.skipped})
        self.metrics.log(self.step, values)

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Dev Rouge-L of pure student samples and the length-normalised k3 reverse-KL estimate on them."""
        prompts = self.data.dev_prompts
        if prompts is None or len(prompts) == 0:
            return {}
        strategy, e = self.strategy, self.cfg.eval
        count = len(prompts) if e.num_prompts < 0 else min(e.num_prompts, len(prompts))
        per_rank = -(-count // strategy.world_size)
        mine = [min(strategy.rank * per_rank + i, count - 1) for i in range(per_rank)]
        loader = DataLoader(torch.utils.data.Subset(prompts, mine), batch_size=e.batch_size,
                            collate_fn=self.data.prompt_collator)
        generator = torch.Generator(device=strategy.device)
        generator.manual_seed(e.seed + strategy.rank)
        # [Σ k3 per sequence, number of sequences, Σ teacher log-prob over tokens, number of tokens]
        texts, sums = [], torch.zeros(4, dtype=torch.float64, device=strategy.device)
        # the last rank's share is padded with repeats of the last prompt (equal collective calls): weight them 0
        real = torch.tensor([float(strategy.rank * per_rank + i < count) for i in range(per_rank)],
                            dtype=torch.float64, device=strategy.device)
        offset, routed = 0, self._dev_per_teacher()
        for batch in loader:
            prompt_ids = batch["input_ids"].to(strategy.device)
            prompt_mask = batch["attention_mask"].to(strategy.device)
            with strategy.sampling_model(self.student) as s, strategy.autocast():
                sample = self._sample(s, None, prompt_ids, prompt_mask, max_new_tokens=e.max_new_tokens, alpha=0.0,
                                      temperature=e.temperature, top_k=e.top_k, top_p=e.top_p,
                                      eos_token_id=self.tokenizer.eos_token_id,
                                      pad_token_id=self.tokenizer.pad_token_id, generator=generator,
                                      do_sample=e.do_sample)
            texts.extend(x.strip() for x in self.tokenizer.batch_decode(sample.response_ids, skip_special_tokens=True))
            if self.cfg.minillm.dev_reverse_kl:
                with strategy.autocast():
                    t_lp = teacher_forced_logprobs(self.pt_teacher, prompt_ids, prompt_mask, sample.response_ids,
                                                   sample.response_mask)
                    s_lp = teacher_forced_logprobs(self.student, prompt_ids, prompt_mask, sample.response_ids,
                                                   sample.response_mask)
                mask = sample.response_mask.float()
                w = real[offset:offset + mask.shape[0]]
                def score(teacher, t_lp=None):  # per-row [k3, 1, Σ teacher log-prob, tokens] of `teacher`
                    if t_lp is None:
                        with strategy.autocast():
                            t_lp = teacher_forced_logprobs(teacher, prompt_ids, prompt_mask, sample.response_ids,
                                                           sample.response_mask)
                    return torch.stack([losses.k3_reverse_kl(s_lp, t_lp, mask), torch.ones_like(mask[:, 0]),
                                        (t_lp * mask).sum(-1), mask.sum(-1)], dim=1)  # [B, 4]
                sums += (score(self.pt_teacher, t_lp).to(sums) * w[:, None]).sum(0)
                if routed is not None:
                    routed.add(batch["index"], w, score)
            offset += prompt_ids.shape[0]
        references = [prompts[i]["references"] for i in mine]
        gathered = [p for part in strategy.all_gather_object(list(zip(mine, texts, references))) for p in part]
        unique = {i: (x, ref) for i, x, ref in gathered}
        metrics = {"dev/rougeL": rouge_l([unique[i][0] for i in sorted(unique)],
                                         [unique[i][1] for i in sorted(unique)])}
        if self.cfg.minillm.dev_reverse_kl:
            strategy.all_reduce(sums, "sum")
            metrics["dev/reverse_kl_k3"] = float(sums[0] / sums[1].clamp(min=1))
            # Mean per-token teacher log-likelihood of the student's own samples: rises as KL(q‖p) falls.
            metrics["dev/teacher_logprob"] = float(sums[2] / sums[3].clamp(min=1))
            metrics.update(routed.metrics(strategy) if routed is not None else {})
        return metrics

    def _dev_per_teacher(self):
        """With `teachers:` and dev reverse-KL on: the per-teacher dev sums (minillm.routing.DevPerTeacher)."""
        if self.router is None or not self.cfg.minillm.dev_reverse_kl:
            return None
        routed = DevPerTeacher(self.router, dev_routes(self.cfg, self.data.dev_records), self.strategy.device)
        return routed if routed.active else None  # no dev prompt has a route: no extra teacher forwards

    def _evaluate_and_select(self) -> None:
        evaluate_and_select(self)

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "phase": self.phase, "ppo_epoch": self.ppo_epoch,
                 "micro_index": self.micro_index, "prompt_sampler": self.prompt_sampler.state_dict(),
                 "best": self.best.state_dict(), "window": self.window.state_dict(),
                 "nan_skips": self.nan_guard.skipped, "method": "minillm",
                 "world_size": self.strategy.world_size, "phase_stats": dict(self._phase_stats)}
        if self.use_pt:
            state["pt_sampler"] = self.pt_sampler.state_dict()
        if self.router is not None:
            state["routing"] = self.router.state_dict()
        return state

    def save(self) -> None:

        directory = self.output_dir / "checkpoints" / f"step-{self.step}"
        self.saved_step = self.step
        with self.timer("save"), measure_save(getattr(self, "stopper", None)):
            save_checkpoint(directory, self.strategy, self.tokenizer, self.state_dict(),
                            self.cfg.train.keep_checkpoints, self.output_dir, extra=self._buffer_files())

    def _buffer_files(self) -> dict[str, Any]:
        if self.buffer is None:
            return {}
        return {f"rollout-rank{self.strategy.rank}.pt": self.buffer.state_dict()}

    def _resume(self, directory: Path) -> None:
        state = load_checkpoint(directory, self.strategy)
        self.step, self.phase = int(state["step"]), int(state["phase"])
        self.ppo_epoch, self.micro_index = int(state["ppo_epoch"]), int(state["micro_index"])
        if self.router is not None:  # every teacher's cursor and counters; the phase picks the active teacher
            self.router.load_state_dict(state["routing"])
            self._route_phase()
        else:
            self.prompt_sampler.load_state_dict(state["prompt_sampler"])
        if self.use_pt:
            self.pt_sampler.load_state_dict(state["pt_sampler"])
        self.best.load_state_dict(state["best"])
        self.window.load_state_dict(state["window"])
        self.nan_guard.skipped = int(state["nan_skips"])
        self._phase_stats = dict(state["phase_stats"])
        buffer_file = directory / f"rollout-rank{self.strategy.rank}.pt"
        self.buffer = Rollout.from_state_dict(torch.load(buffer_file, weights_only=True)) \
            if buffer_file.is_file() else None
        self.metrics.truncate_after(self.step)
        log.info("resumed from %s at step %d (phase %d, ppo epoch %d, micro-batch %d)", directory, self.step,
                 self.phase, self.ppo_epoch, self.micro_index)
