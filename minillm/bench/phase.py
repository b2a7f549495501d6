"""One whole MiniLLM phase measured end to end through :class:`MiniLLMTrainer` (``minillm-bench --phase``).

:func:`minillm.bench.run_benchmark` times each part of a phase on its own and composes a phase estimate; this
module runs the real thing instead: the trainer's own ``run_phase`` (rollout and scoring of
``num_rollouts`` prompts, then ``ppo_epochs`` passes of micro-steps with the PPO term, the single-step KL and the
pre-training loss, optimizer steps included) under each configuration below, from the same student weights,
prompts and pre-training chunks, in one process.

* ``naive``: ``rollout.engine: naive`` (both models at every step), plain (unchunked) losses, the teacher re-run
  on every rollout and pre-training micro-batch — what the reference does;
* ``fast``: the coin engine (static caches + CUDA graphs on CUDA), chunked losses and the teacher's hidden states
  reused across PPO epochs — the defaults;
* ``speculative`` (opt-in): ``fast`` with the speculative engine (student drafts, teacher verifies; eager);
* ``fast_pt_cache`` (with ``pt_cache_top_k > 0``): ``fast`` plus a teacher top-k cache of the pre-training
  chunks (``minillm.pt_teacher_cache``), built once before timing (its build time is reported separately, as
  the offline cost it is).

Prompts and the pre-training corpus are random token ids (:class:`RandomTokenCorpus`); no EOS is set, so every
rollout runs to ``max_new_tokens`` and the token counts of the variants are equal.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..generation import compile_stats

__all__ = ["PhaseSetup", "RandomTokenCorpus", "random_prompts", "phase_config", "phase_trainer", "measure_phases",
           "VARIANTS"]

# dotted config key → value, per variant (applied over the shared setup)
VARIANTS: dict[str, dict[str, Any]] = {
    "naive": {"rollout.engine": "naive", "minillm.chunked_losses": False, "minillm.reuse_teacher": False},
    "fast": {"rollout.engine": "fast", "minillm.chunked_losses": True, "minillm.reuse_teacher": True},
    "speculative": {"rollout.engine": "speculative", "minillm.chunked_losses": True, "minillm.reuse_teacher": True},
}


@dataclass
class PhaseSetup:
    """The shared shape of a measured phase."""

    num_rollouts: int = 256
    chunk_size: int = 64  # prompts per generation batch
    micro_batch: int = 16
    ppo_epochs: int = 4
    prompt_len: int = 128
    new_tokens: int = 256
    alpha: float = 0.2
    pt_seq_length: int = 385  # chunk length of the corpus (inputs/labels are one shorter)
    loss_chunk_size: int = 1024
    precision: str = "fp32"  # the student's strategy precision: fp32, or bf16 autocast over fp32 weights
    cuda_graphs: bool = True
    pt_cache_top_k: int = 0  # > 0: also the fast_pt_cache variant
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_rollouts", "chunk_size", "micro_batch", "ppo_epochs", "prompt_len", "new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"PhaseSetup.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_rollouts % self.micro_batch or self.num_rollouts % self.chunk_size:
            raise ValueError(f"PhaseSetup.num_rollouts ({self.num_rollouts}) must be a multiple of micro_batch "
                             f"({self.micro_batch}) and chunk_size ({self.chunk_size})")
        if self.pt_seq_length < 2:
            raise ValueError(f"PhaseSetup.pt_seq_length must be >= 2, got {self.pt_seq_length}")

    @property
    def pt_chunks_per_phase(self) -> int:
        return self.ppo_epochs * (self.num_rollouts // self.micro_batch) * self.micro_batch


class RandomTokenCorpus(torch.utils.data.Dataset):
    """``num_chunks`` chunks of ``seq_length`` random token ids in [3, vocab), as :class:`PackedCorpus` items
    (``input_ids`` = chunk[:-1], ``labels`` = chunk[1:], ``index``)."""

    def __init__(self, vocab: int, num_chunks: int, seq_length: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(3, vocab, (num_chunks, seq_length), generator=g)
        self.seq_length = seq_length
        self.path = f"<random tokens: {num_chunks} x {seq_length}, vocab {vocab}, seed {seed}>"

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        chunk = self.tokens[i]
        return {"input_ids": chunk[:-1], "labels": chunk[1:], "index": i}


def random_prompts(vocab: int, count: int, prompt_len: int, seed: int = 0):
    """A :class:`minillm.data.PromptDataset` of ``count`` random prompts: every other one ¾ as long, so generation
    batches are left-padded as real ones are."""
    from ..data import PromptDataset

    g = torch.Generator().manual_seed(seed)
    lengths = [prompt_len if i % 2 == 0 else max(1, 3 * prompt_len // 4) for i in range(count)]
    ids = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    return PromptDataset(ids, [[""] for _ in ids], list(range(count)))


def phase_config(setup: PhaseSetup, variant: str, output_dir: str, pt_cache: str | None = None):
    """The :class:`RunConfig` of one variant: one phase (``max_steps`` = its optimizer steps), no evaluation,
    no checkpoints, local strategy on the models' device."""
    from ..config import RunConfig, apply_overrides, from_dict

    if variant not in VARIANTS and variant != "fast_pt_cache":
        raise ValueError(f"unknown phase variant {variant!r}; choose one of {sorted(VARIANTS) + ['fast_pt_cache']}")
    overrides = dict(VARIANTS["fast" if variant == "fast_pt_cache" else variant])
    if variant == "fast_pt_cache":
        overrides["minillm.pt_teacher_cache"] = pt_cache
    data = {
        "method": "minillm", "output_dir": output_dir, "seed": setup.seed,
        "student": {"path": "<in memory>", "dtype": setup.precision}, "teacher": {"path": "<in memory>"},
        "data": {"max_prompt_length": setup.prompt_len, "max_length": setup.prompt_len + setup.new_tokens,
                 "pretrain": "<in memory>", "pretrain_seq_length": setup.pt_seq_length},
        "train": {"max_steps": setup.ppo_epochs * setup.num_rollouts // setup.micro_batch,
                  "micro_batch_size": setup.micro_batch, "global_batch_size": setup.micro_batch,
                  "eval_interval": 0, "save_interval": 0, "select_best_by": "none"},
        "optim": {"scheduler": "constant"},
        "rollout": {"num_rollouts": setup.num_rollouts, "chunk_size": setup.chunk_size,
                    "max_new_tokens": setup.new_tokens, "teacher_mix_alpha": setup.alpha,
                    "cuda_graphs": setup.cuda_graphs},
        "minillm": {"ppo_epochs": setup.ppo_epochs, "loss_chunk_size": setup.loss_chunk_size, "ptx_coef": 1.0},
        "strategy": {"backend": "local", "device": "auto"},
        "logging": {"progress_bar": False, "log_interval": 10 ** 9},
    }
    data = apply_overrides(data, [f"{k}={_yaml(v)}" for k, v in overrides.items()])
    return from_dict(RunConfig, data, source=f"<bench phase {variant}>").resolve(1)


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_phases(student: torch.nn.Module, teacher: torch.nn.Module, setup: PhaseSetup,
                   variants: tuple[str, ...] = ("naive", "fast")) -> dict[str, Any]:
    """Run one phase per variant from the same starting student and return seconds, tokens/s and the speed-ups.

    ``student`` is trained in place during each variant and restored afterwards. Each variant's first
    generation batch is sampled once untimed first (one-time costs: compilation and CUDA-graph capture on CUDA,
    kernel selection), then the phase is timed with the trainer's own phase timer (CUDA-synchronised).
    """
    device = next(student.parameters()).device
    vocab = min(student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    prompts = random_prompts(vocab, setup.num_rollouts, setup.prompt_len, setup.seed)
    corpus = RandomTokenCorpus(vocab, setup.pt_chunks_per_phase, setup.pt_seq_length, setup.seed + 1)
    initial = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
    result: dict[str, Any] = {"setup": dict(setup.__dict__), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="minillm-bench-phase-") as tmp:
        pt_cache = None
        if setup.pt_cache_top_k > 0:
            from ..data.teacher_cache import build_teacher_topk_cache

            variants = tuple(variants) + ("fast_pt_cache",)
            _sync(device)
            start = time.perf_counter()
            autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
            pt_cache = str(build_teacher_topk_cache(corpus, teacher, Path(tmp) / "pt-cache", top_k=setup.pt_cache_top_k,
                                                    batch_size=setup.micro_batch, autocast=autocast))
            _sync(device)
            result["pt_cache_build"] = {"seconds": time.perf_counter() - start, "top_k": setup.pt_cache_top_k,
                                        "chunks": len(corpus),
                                        "bytes": sum(f.stat().st_size for f in Path(pt_cache).iterdir())}
        for variant in variants:
            student.load_state_dict(initial)
            trainer = phase_trainer(student, teacher, setup, variant, str(Path(tmp) / variant), prompts, corpus,
                                    pt_cache)
            compile_stats.install()
            before = compile_stats.STATS.copy()
            _warm_up(trainer)
            warmed = compile_stats.STATS.copy()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            stats = trainer.run_phase()
            _sync(device)
            wall = time.perf_counter() - start
            entry = {k.removeprefix("time/") + "_seconds": v for k, v in stats.items() if k.startswith("time/")}
            entry.update(seconds=wall, optimizer_steps=trainer.step, nan_skips=trainer.nan_guard.skipped,
                         generated_tokens_per_s=setup.num_rollouts * setup.new_tokens / wall,
                         mean_response_length=stats.get("rollout/response_length"),
                         peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
            # compiles/captures of the warm-up batch, and of the timed phase (its last, smaller batch and any other
            # shape the warm-up did not cover): issue 17 item 3 wants the latter at 0
            entry["compile"] = {"warmup": warmed.minus(before).as_dict(),
                                "phase": compile_stats.STATS.minus(warmed).as_dict()}
            result["variants"][variant] = entry
            trainer.metrics.close()
            del trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    student.load_state_dict(initial)
    if "naive" in result["variants"]:
        naive = result["variants"]["naive"]["seconds"]
        result["speedup_vs_naive"] = {k: naive / v["seconds"] for k, v in result["variants"].items() if k != "naive"}
    result["note"] = ("one phase through MiniLLMTrainer.run_phase: rollout + scoring of num_rollouts prompts, then "
                      "ppo_epochs passes of micro-steps (PPO term, single-step KL, PT loss, optimizer steps); "
                      "seconds = wall time of the phase after an untimed warm-up generation batch")
    return result


def phase_trainer(student, teacher, setup: PhaseSetup, variant: str, output_dir: str, prompts, corpus,
                  pt_cache: str | None = None):
    """A :class:`MiniLLMTrainer` of one variant on the models' device, over ``prompts`` (a PromptDataset) and
    ``corpus``, with a tokenizer stand-in that has no EOS (every row runs to ``new_tokens``) and pads with 0."""
    from ..data import PromptCollator
    from ..strategy import build_strategy
    from ..trainers.minillm import MiniLLMTrainer

    cfg = phase_config(setup, variant, output_dir, pt_cache)
    cfg.strategy.device = next(student.parameters()).device.type
    tokenizer = SimpleNamespace(eos_token_id=None, pad_token_id=0)
    data = SimpleNamespace(train_prompts=prompts, dev_prompts=None, prompt_collator=PromptCollator(0))
    return MiniLLMTrainer(cfg, student, tokenizer, data, build_strategy(cfg).setup(), teacher, corpus=corpus)


def _warm_up(trainer) -> None:
    """Sample one generation batch untimed (compiles/captures the decode step on CUDA) without touching the
    trainer's prompt stream."""
    r = trainer.cfg.rollout
    batch = trainer.data.prompt_collator([trainer.data.train_prompts[i] for i in range(r.chunk_size)])
    device = trainer.strategy.device
    with torch.no_grad(), trainer.strategy.autocast():
        trainer._sample(trainer.student, trainer.teacher if r.teacher_mix_alpha > 0 else None,
                        batch["input_ids"].to(device), batch["attention_mask"].to(device),
                        max_new_tokens=r.max_new_tokens, alpha=r.teacher_mix_alpha, temperature=r.temperature,
                        top_k=r.top_k, top_p=r.top_p, eos_token_id=None, pad_token_id=0,
                        generator=torch.Generator(device=device).manual_seed(0), do_sample=r.do_sample)
