"""SFTTrainer: supervised fine-tuning and the word-level baselines.

``method: sft``   loss = CE on the response (and its EOS).
``method: kd``    loss = (1 - r)·CE + r·D(p_teacher, q_student) per token, r = ``kd.kd_ratio`` (0.5), D chosen by
                  ``kd.divergence``. With ``fkl`` the term is the reference's cross-entropy form −Σ_v p_v log q_v
                  (same gradient as KL(p‖q); the value differs by the teacher's entropy).
``method: seqkd`` the same losses on teacher-generated responses (``data.train`` = a minillm-generate JSONL).

The loop is explicit: micro-batch → forward → loss → NaN guard → backward → (optimizer step at accumulation
boundaries) → log / evaluate / checkpoint at optimizer-step intervals. Everything that decides what happens
next (step, data cursor, RNG, optimizer, scheduler, best metric) is checkpointed, so a resumed run reproduces an
uninterrupted one exactly (bitwise on CPU).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..losses import chunked as chunked_losses
from .. import losses
from ..config import RunConfig, to_dict
from ..data import ResumableSampler
from ..evaluation import rouge_l
from ..evaluation.generation import generate_texts
from ..tracking import MetricsLogger, get_logger
from .student_data import StudentData, student_sampler
from .common import (BestTracker, MetricWindow, NanGuard, PhaseTimer, evaluate_and_select, export_model,
                     guarded_micro_step, load_checkpoint, mean_over_ranks, save_checkpoint,
                     stop_early, stop_gracefully, to_device, train_under_stop_control)
from .preemption import measure_save
from .served import TeacherServerUnavailable, mark_step_start, next_micro_batch, stop_for_teacher_server

log = get_logger()


class SFTTrainer:
    """Trains ``student`` with SFT, KD or SeqKD. ``teacher`` is required for kd/seqkd.

    ``data`` is a :class:`minillm.data.InstructionData` (train/dev SFT datasets and dev prompts).
    """

    def __init__(self, config: RunConfig, student, tokenizer, data, strategy, teacher=None, alignment=None):
        self.cfg = config
        self.tokenizer = tokenizer
        self.data = data
        self.strategy = strategy
        self.alignment = alignment
        self.output_dir = Path(config.output_dir)
        if config.method in ("kd", "seqkd") and teacher is None:
            from ..config import ConfigError

            raise ConfigError(f"method `{config.method}` needs a teacher")
        self.use_teacher = config.method in ("kd", "seqkd") and config.kd.kd_ratio > 0

        t = config.train
        self.sampler = ResumableSampler(len(data.train), seed=config.seed, rank=strategy.rank,
                                        world_size=strategy.world_size, shuffle=True, drop_last=True)
        micro_per_epoch = len(self.sampler) // t.micro_batch_size
        self.steps_per_epoch = micro_per_epoch // t.gradient_accumulation_steps
        if self.steps_per_epoch == 0:
            from ..config import ConfigError

            raise ConfigError(f"{len(data.train)} training examples are fewer than one optimizer step needs "
                             f"(train.global_batch_size={t.global_batch_size}); lower the batch size")
        by_epochs = t.epochs * self.steps_per_epoch if t.epochs > 0 else None
        self.total_steps = min(s for s in (t.max_steps if t.max_steps > 0 else None, by_epochs) if s is not None)

        # kd.ptx_coef: a language-modelling loss on a pre-training corpus beside the KD loss (DistiLLM's --lm-coef)
        self.use_pt = config.kd.ptx_coef > 0
        if self.use_pt:
            from ..data import load_or_pack_corpus

            self.corpus = load_or_pack_corpus(config.data, tokenizer)
            self.pt_sampler = ResumableSampler(len(self.corpus), seed=config.seed + 1, rank=strategy.rank,
                                               world_size=strategy.world_size, shuffle=True, drop_last=True)
            self._pt_iter = None

        from ..optim import build_optimizer, build_scheduler

        optimizer = build_optimizer(student, config.optim)
        scheduler = build_scheduler(optimizer, config.optim, self.total_steps)
        self.student = strategy.prepare_student(student, optimizer, scheduler)
        # kd.teacher_cache: the teacher's top-k distributions on data.train, computed once (minillm.data.kd_cache);
        # the KD term of fixed-data batches reads them. Without student-generated data the teacher is never placed
        # on a device.
        self.teacher_cache = None
        if self.use_teacher and config.kd.teacher_cache is not None:
            from ..data.kd_cache import ResponseTopKCache

            self.teacher_cache = ResponseTopKCache(config.kd.teacher_cache)
            rows = alignment.vocab_size if alignment is not None else teacher.get_output_embeddings().weight.shape[0]
            self.teacher_cache.check(data.train, rows)
            built_from = self.teacher_cache.meta.get("teacher")
            if built_from and built_from != config.teacher.path:  # weights are not fingerprinted: say so
                log.warning("kd.teacher_cache %s was built from teacher %s but teacher.path is %s; rebuild it if "
                            "the teacher changed", config.kd.teacher_cache, built_from, config.teacher.path)
        online = self.use_teacher and (self.teacher_cache is None or StudentData.active(config.kd))
        self.router = None
        if isinstance(teacher, dict):  # `teachers:` (minillm.routing): each optimizer step from one teacher's records
            from ..routing import build_router

            self.router = build_router(config, data, {n: strategy.prepare_teacher(m) for n, m in teacher.items()},
                                       strategy)
            self.teacher = self.router.models[0]
        else:
            self.teacher = strategy.prepare_teacher(teacher) if online else None

        self.student_data = None  # GKD / DistiLLM: student-generated micro-batches (kd.on_policy_fraction, ...)
        if StudentData.active(config.kd):
            self.student_data = StudentData(
                config.kd, seed=config.seed, rank=strategy.rank, micro_batch_size=t.micro_batch_size,
                total_steps=self.total_steps, sft_collator=data.sft_collator, prompt_collator=data.prompt_collator,
                sample_fn=student_sampler(self.student, strategy, tokenizer, config.kd))

        self.step = 0
        self.nan_guard = NanGuard(strategy, t.max_nan_skips)
        self.best = BestTracker(t.select_best_by)
        self.window = MetricWindow()
        self.timer = PhaseTimer()
        self.metrics = MetricsLogger(self.output_dir, config.logging, strategy.is_main,
                                     run_name=self.output_dir.name, config=to_dict(config))

    # ------------------------------------------------------------------------------ batches
    def _micro_batches(self):
        """Endless micro-batches in sampler order; the sampler's state is the data cursor."""
        collate = self.data.sft_collator
        while self.router is not None:  # the teacher of the step in progress: the same on every rank
            self._routed = self.router.teacher_of_phase(self.step)
            self.teacher = self.router.models[self._routed]
            yield self.router.micro_batch(self._routed, self.data.train, self.cfg.train.micro_batch_size, collate)
        while True:
            loader = DataLoader(self.data.train, batch_size=self.cfg.train.micro_batch_size, sampler=self.sampler,
                                collate_fn=collate, drop_last=True, num_workers=0)
            for batch in loader:
                yield batch
            self.sampler.set_epoch(self.sampler.epoch + 1)

    # ------------------------------------------------------------------------------ losses
    def _cached(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether the KD term reads ``kd.teacher_cache``: batches of the training set carry their dataset
        ``index``; student-generated ones (GKD, DistiLLM) do not and need the online teacher."""
        return self.teacher_cache is not None and "index" in batch

    def _prefetch_teacher(self, batch, inputs: dict[str, torch.Tensor]) -> None:
        """A served teacher (teacher.server) starts scoring the batch now, while the student runs its forward, and
        the step's next micro-batch too, while this one learns. Never across an optimizer-step boundary: a server
        failure then surfaces at a step's first micro-batch, where the stop's checkpoint is exact."""
        if not (self.use_teacher and not self._cached(batch) and hasattr(self.teacher, "prefetch")):
            return
        self.teacher.prefetch(**inputs)
        if self.student_data is None and getattr(self, "_micro_done", 0) + 1 < self.cfg.train.gradient_accumulation_steps:
            upcoming = next_micro_batch(self.sampler, self.data.train, self.data.sft_collator,
                                        self.cfg.train.micro_batch_size)
            if upcoming is not None and not self._cached(upcoming):
                self.teacher.prefetch(input_ids=upcoming["input_ids"], attention_mask=upcoming["attention_mask"])

    def _stateful_parts(self) -> dict[str, Any]:
        """What a micro-step advances besides the weights (rewound by minillm.trainers.served)."""
        parts = {"sampler": self.sampler}
        if self.use_pt:
            parts["pt_sampler"] = self.pt_sampler
        if self.student_data is not None:
            parts["student_data"] = self.student_data
        return parts

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch and its named parts (python floats, for logging): the SFT/KD loss, plus
        ``kd.ptx_coef`` × the language-modelling loss on a pre-training batch when that is on."""
        loss, parts = self._chunked_loss(batch) if self.cfg.kd.chunked else self._plain_loss(batch)
        if self.use_pt:
            pt = self._pt_loss(self._next_pt_batch())
            loss = loss + self.cfg.kd.ptx_coef * pt
            parts["pt_loss"] = float(pt.detach())
            parts["loss"] = float(loss.detach())
        return loss, parts

    def _next_pt_batch(self) -> dict[str, torch.Tensor]:
        if self._pt_iter is None:
            def batches():
                while True:
                    loader = DataLoader(self.corpus, batch_size=self.cfg.train.micro_batch_size,
                                        sampler=self.pt_sampler, drop_last=True, num_workers=0)
                    yield from loader
                    self.pt_sampler.set_epoch(self.pt_sampler.epoch + 1)
            self._pt_iter = batches()
        return {k: v.to(self.strategy.device) if isinstance(v, torch.Tensor) else v
                for k, v in next(self._pt_iter).items()}

    def _pt_loss(self, pt_batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of the student on a corpus batch (every position scored), chunked like the KD loss."""
        trim = self.alignment.trim if self.alignment is not None else (lambda x: x)
        labels = pt_batch["labels"]
        if self.cfg.kd.chunked:
            from ..losses.heads import global_chunk_count, hidden_and_head

            hidden, head = hidden_and_head(self.student, pt_batch["input_ids"], trim=trim,
                                           autocast=self.strategy.autocast)
            chunk = self.cfg.kd.chunk_size
            return chunked_losses.chunked_pt_loss(hidden, head, labels, kd_ratio=0.0, chunk_size=chunk,
                                                  num_chunks=global_chunk_count(labels != -100, chunk, self.strategy))
        with self.strategy.autocast():
            logits = self.student(input_ids=pt_batch["input_ids"]).logits.float()
        return losses.pt_loss(trim(logits), labels)

    def _plain_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The SFT/KD loss from full [B, L, V] logits (kd.chunked=false)."""
        self._prefetch_teacher(batch, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        with self.strategy.autocast():
            out = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits.float()
        if self.alignment is not None:
            logits = self.alignment.trim(logits)
        labels = batch["labels"]
        ce = losses.pt_loss(logits, labels)
        if not self.use_teacher:
            return ce, {"loss": float(ce.detach()), "ce": float(ce.detach())}
        with torch.no_grad():
            if self._cached(batch):  # log-probs are logits of the same distribution
                t_logits = self.teacher_cache.topk(batch["index"], labels).dense(logits.device)
            else:
                t_logits = self.teacher(input_ids=batch["input_ids"],
                                        attention_mask=batch["attention_mask"]).logits.float()
                if self.alignment is not None:
                    t_logits = self.alignment.trim(t_logits)
        kd = self.cfg.kd
        mask = labels != -100
        if kd.divergence == "fkl":
            # Reference KD: -sum_v p_v log q_v at temperature T (pt_loss with kd_ratio=1 is exactly that term).
            kd_term = losses.pt_loss(logits / kd.temperature, labels, t_logits / kd.temperature, kd_ratio=1.0)
        else:
            kd_term = losses.divergence(logits / kd.temperature, t_logits / kd.temperature, mask, kd.divergence,
                                        beta=kd.beta, skew=kd.skew)
        loss = (1.0 - kd.kd_ratio) * ce + kd.kd_ratio * kd_term
        return loss, {"loss": float(loss.detach()), "ce": float(ce.detach()), "kd": float(kd_term.detach())}

    def _chunked_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """``compute_loss`` from hidden states + LM heads, ``kd.chunk_size`` positions at a time: the same values
        (to fp32 rounding) without [B, L, V] fp32 logits of either model (DESIGN §4 memory note)."""
        from ..losses.heads import global_chunk_count, hidden_and_head

        kd, strategy = self.cfg.kd, self.strategy
        trim = self.alignment.trim if self.alignment is not None else (lambda x: x)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        self._prefetch_teacher(batch, inputs)
        hidden, head = hidden_and_head(self.student, **inputs, trim=trim, autocast=strategy.autocast)
        labels = batch["labels"]
        mask = labels != -100
        chunks = dict(chunk_size=kd.chunk_size, num_chunks=global_chunk_count(mask, kd.chunk_size, strategy))
        teacher = {}
        if self._cached(batch):  # top-k rows, expanded chunk by chunk on the device
            teacher = dict(teacher_logprobs=self.teacher_cache.topk(batch["index"], labels))
        elif self.use_teacher:
            with torch.no_grad():
                t_hidden, t_head = hidden_and_head(self.teacher, **inputs, trim=trim, autocast=strategy.autocast)
            teacher = dict(teacher_hidden=t_hidden, teacher_head=t_head)
        terms = chunked_losses.chunked_kd_loss(hidden, head, labels, kd_ratio=kd.kd_ratio, divergence=kd.divergence,
                                               temperature=kd.temperature, beta=kd.beta, skew=kd.skew, **chunks,
                                               **teacher)
        parts = {"loss": float(terms.loss.detach()), "ce": float(terms.ce)}
        if terms.kd is not None:
            parts["kd"] = float(terms.kd)
        return terms.loss, parts

    # ------------------------------------------------------------------------------ loop
    def train(self, resume_from: str | Path | None = None) -> dict[str, Any]:
        """Train to the end, or until a stop signal / ``train.max_time``: see :func:`train_under_stop_control`."""
        return train_under_stop_control(self, resume_from)

    def _train(self, resume_from: str | Path | None = None) -> dict[str, Any]:
        cfg, strategy = self.cfg, self.strategy
        if resume_from is not None:
            self._resume(Path(resume_from))
        elif cfg.train.eval_at_start:
            self._evaluate_and_select()
        eval_every = cfg.train.eval_interval if cfg.train.eval_interval >= 0 else self.steps_per_epoch
        save_every = cfg.train.save_interval if cfg.train.save_interval >= 0 else self.steps_per_epoch
        window = self.window
        bar = None
        if strategy.is_main and cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=cfg.method, dynamic_ncols=True)
        batches = self._micro_batches()
        self.student.train()
        served, micro_done = getattr(self.teacher, "is_remote_teacher", False), 0
        while self.step < self.total_steps:
            self._micro_done = micro_done  # read by _prefetch_teacher
            if served and micro_done == 0:  # where a teacher.server failure rewinds to (minillm.trainers.served)
                mark_step_start(self, self._stateful_parts())
            try:
                with self.timer("data"):
                    batch = to_device(next(batches), strategy.device)
                if self.student_data is not None:
                    with self.timer("student_data"):
                        batch, _ = self.student_data.prepare(batch, self.step)
                with self.timer("forward"):
                    loss, parts = self.compute_loss(batch)
            except TeacherServerUnavailable as error:
                return stop_for_teacher_server(self, error, micro_done)
            tokens = int((batch["labels"] != -100).sum())
            result = guarded_micro_step(self, loss, parts, tokens=tokens, phases=("backward", "optimizer"))
            routed_tokens = getattr(self, "_routed_tokens", 0) + tokens
            self._routed_tokens = 0 if result.stepped else routed_tokens
            if not result.stepped:
                micro_done += 1
                continue
            micro_done = 0
            if self.router is not None:
                rows = cfg.train.global_batch_size
                self._routed_values = self.router.record_step(self._routed, routed_tokens, rows, strategy)
            self.step += 1
            if bar is not None:
                bar.update(1)
                if window.count:
                    bar.set_postfix(loss=f"{window.mean('loss'):.4f}")
            if self.step % cfg.logging.log_interval == 0 or self.step == self.total_steps:
                tokens = window.tokens
                values = mean_over_ranks(strategy, window.pop(), strategy.device)
                timing = self.timer.pop()
                elapsed = sum(timing.values())
                values.update(timing)
                if served:  # server request time and the fraction of it hidden behind the student's forward
                    values.update(self.teacher.pop_timings())
                values.update({"train/lr": strategy.current_lr(), "train/grad_norm": result.grad_norm,
                               "train/tokens_per_s": tokens * strategy.world_size / elapsed if elapsed else 0.0,
                               "train/epoch": self.sampler.epoch, "train/nan_skips": self.nan_guard.skipped})
                if self.student_data is not None:
                    values.update(self.student_data.log_values())
                if self.router is not None:
                    values.update(self._routed_values)
                self.metrics.log(self.step, values)
            if eval_every and (self.step % eval_every == 0 or self.step == self.total_steps):
                self._evaluate_and_select()
            if save_every and self.step % save_every == 0 and self.step < self.total_steps:
                self.save()
            if self.step == cfg.train.stop_at_step and self.step < self.total_steps:
                return stop_early(self, bar)
            if self.step < self.total_steps and self.stopper.should_stop():

                return stop_gracefully(self, bar, self.stopper.reason)
        if bar is not None:
            bar.close()
        self.save()
        export_model(self.output_dir / "final", strategy, self.student, self.tokenizer)
        self.metrics.close()
        return {"step": self.step, "best": self.best.best, "best_step": self.best.best_step,
                "nan_skips": self.nan_guard.skipped}

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Dev loss (token-mean CE over the whole dev set) and dev Rouge-L of sampled answers."""
        if self.data.dev is None or len(self.data.dev) == 0:
            return {}
        strategy, e = self.strategy, self.cfg.eval
        model = self.student
        was_training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=strategy.device)
        indices = list(range(strategy.rank, len(self.data.dev), strategy.world_size))
        # Every rank runs the same number of forwards (ZeRO-3 parameter gathers are collective): a short share
        # is padded with repeats whose labels are masked, so they add no token to the loss.
        real = len(indices)
        indices += indices[-1:] * (-(-len(self.data.dev) // strategy.world_size) - real)
        loader = DataLoader(torch.utils.data.Subset(self.data.dev, indices), batch_size=e.batch_size,
                            collate_fn=self.data.sft_collator)
        offset = 0
        for batch in loader:
            batch = to_device(batch, strategy.device)
            rows = torch.arange(offset, offset + batch["labels"].shape[0], device=strategy.device)
            offset += batch["labels"].shape[0]
            batch["labels"] = batch["labels"].masked_fill((rows >= real)[:, None], -100)
            with strategy.autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            if self.alignment is not None:
                logits = self.alignment.trim(logits)
            n = (batch["labels"] != -100).sum()
            total[0] += losses.pt_loss(logits, batch["labels"]).double() * n
            total[1] += n
        strategy.all_reduce(total, "sum")
        metrics = {"dev/loss": float(total[0] / total[1].clamp(min=1))}
        if e.rouge:
            metrics["dev/rougeL"] = self._dev_rouge()
        model.train(was_training)
        return metrics

    def _dev_rouge(self) -> float:
        strategy, e = self.strategy, self.cfg.eval
        prompts = self.data.dev_prompts
        count = len(prompts) if e.num_prompts < 0 else min(e.num_prompts, len(prompts))
        # Every rank runs the same number of generate calls (ZeRO-3 gathers are collective).
        per_rank = math.ceil(count / strategy.world_size)
        mine = [min(strategy.rank * per_rank + i, count - 1) for i in range(per_rank)]
        loader = DataLoader(torch.utils.data.Subset(prompts, mine), batch_size=e.batch_size,
                            collate_fn=self.data.prompt_collator)
        references = [prompts[i]["references"] for i in mine]
        with strategy.sampling_model(self.student) as module:
            texts = generate_texts(module, self.tokenizer, loader, max_new_tokens=e.max_new_tokens,
                                   do_sample=e.do_sample, temperature=e.temperature, top_k=e.top_k, top_p=e.top_p,
                                   seed=e.seed, rank=strategy.rank, device=strategy.device, engine=e.engine)
        pairs = [(i, t, r) for i, t, r in zip(mine, texts, references)]
        gathered = [p for part in strategy.all_gather_object(pairs) for p in part]
        unique = {i: (t, r) for i, t, r in gathered}  # drop the padding duplicates of the last rank
        preds = [unique[i][0] for i in sorted(unique)]
        refs = [unique[i][1] for i in sorted(unique)]
        return rouge_l(preds, refs)

    def _evaluate_and_select(self) -> None:
        metrics = evaluate_and_select(self)
        if self.student_data is not None and "dev/loss" in metrics:
            self.student_data.observe_dev_loss(metrics["dev/loss"])  # DistiLLM's adaptive schedule

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "sampler": self.sampler.state_dict(), "best": self.best.state_dict(),
                "window": self.window.state_dict(), "nan_skips": self.nan_guard.skipped, "method": self.cfg.method,
                "world_size": self.strategy.world_size,
                **({"pt_sampler": self.pt_sampler.state_dict()} if self.use_pt else {}),
                **({"routing": self.router.state_dict()} if self.router is not None else {})}

    def save(self) -> None:

        self.saved_step = self.step
        with self.timer("save"), measure_save(getattr(self, "stopper", None)):
            extra = {} if self.student_data is None else {  # per rank: the replay buffer differs between ranks
                f"student-data-rank{self.strategy.rank}.pt": self.student_data.state_dict()}
            save_checkpoint(self.output_dir / "checkpoints" / f"step-{self.step}", self.strategy, self.tokenizer,
                            self.state_dict(), self.cfg.train.keep_checkpoints, self.output_dir, extra=extra)

    def _resume(self, directory: Path) -> None:
        state = load_checkpoint(directory, self.strategy)
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        if self.router is not None:  # every teacher's cursor and counters
            self.router.load_state_dict(state["routing"])
        if self.use_pt:
            self.pt_sampler.load_state_dict(state["pt_sampler"])
            self._pt_iter = None  # re-created at the restored cursor
        self.best.load_state_dict(state["best"])
        self.window.load_state_dict(state["window"])
        self.nan_guard.skipped = int(state["nan_skips"])
        if self.student_data is not None:
            student_file = directory / f"student-data-rank{self.strategy.rank}.pt"
            if not student_file.is_file():
                from ..errors import CheckpointError

                raise CheckpointError(f"{student_file}: missing; the checkpoint was written without "
                                        "kd.on_policy_fraction / kd.adaptive_off_policy")
            self.student_data.load_state_dict(torch.load(student_file, weights_only=True))
        self.metrics.truncate_after(self.step)
        log.info("resumed from %s at step %d", directory, self.step)
