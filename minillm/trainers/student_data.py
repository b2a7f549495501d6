"""Student-generated training data for the word-level trainers (GKD and DistiLLM on ``SFTTrainer``).

A batch-preparation step that runs before ``SFTTrainer.compute_loss``: with some probability a micro-batch's
responses are replaced by responses the *student* samples for the same prompts, and the unchanged word-level loss
(CE + ``kd.divergence``) then runs on the sampled tokens. Two schedules:

* **GKD** (Agarwal et al., ICLR 2024), ``kd.on_policy_fraction = λ``: each micro-batch is on-policy with
  probability λ. λ = 0 leaves every batch untouched (the plain kd/seqkd run, bitwise); λ = 1 is fully on-policy.
* **DistiLLM** (Ko et al., ICML 2024), ``kd.adaptive_off_policy``: the probability ``threshold`` of using student
  data starts at ``kd.adaptive_init`` and rises by ``kd.adaptive_step`` (capped at 1) whenever the dev loss is at
  least ``kd.adaptive_loss_eps`` above the loss at the previous raise (the first observed dev loss is the
  baseline). Fresh samples are pushed to a FIFO replay buffer of ``kd.replay_capacity`` sequences. With u ~ U(0, 1)
  per micro-batch and s = threshold × ratio(step) (``kd.replay_ratio``: decreasing 1 − step/total, constant 0.5,
  increasing step/total):

  - u < s, or u < threshold while the buffer is not yet full → sample fresh from the student (and store them);
  - otherwise u < threshold → replay ``micro_batch_size`` sequences drawn from the buffer without replacement;
  - otherwise → the fixed data.

  This is the decision rule of DistiLLM's ``finetune.py``. One deliberate difference: its *GKD-style* ``mixed``
  mode trains on a random buffer batch right after generating; GKD here trains on the fresh samples, as the GKD
  paper describes.

Sampled batches have the SFT layout: ``input_ids`` = prompt + response without its last token, ``labels`` = the
response tokens up to and including the first EOS (every sampled token when no EOS came within
``kd.student_max_new_tokens``), −100 on the prompt and on padding. Samples are drawn with
:func:`minillm.generation.sampling.mixed_sample` at α = 0 (pure student, eval mode, no grad; previous modes restored).

Determinism and resume: the per-micro-batch coin and the replay draw come from a generator seeded by
(seed, micro-batch counter), identical on every rank, so every rank makes the same choice (a rank sampling
alone would deadlock ZeRO-3's collective parameter gathers); the sampling generator adds the rank. The counter,
the schedule, the buffer and the log counts are the whole state (:meth:`StudentData.state_dict`), so a resumed
run is bitwise the uninterrupted one on CPU.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from ..data.collate import IGNORE_INDEX
from ..data.instruction import sft_item
from ..generation.sampling import mixed_sample

FIXED, FRESH, REPLAY = "data", "student", "replay"


def prompt_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Prompt length of each row of an SFT batch: labels [B, T] → [B] long.

    ``sft_item`` masks the first ``prompt_length − 1`` labels, so the first label ≠ −100 sits at prompt_length − 1.
    """
    valid = labels != IGNORE_INDEX
    if not bool(valid.any(dim=1).all()):
        raise ValueError("minillm.student_data: a batch row has no response label; cannot locate its prompt")
    return valid.long().argmax(dim=1) + 1


def split_prompts(batch: dict[str, torch.Tensor], prompt_collator: Callable) -> dict[str, Any]:
    """The prompts of a right-padded SFT batch, left-padded for generation by ``prompt_collator``."""
    lengths = prompt_lengths(batch["labels"]).tolist()
    items = [{"input_ids": batch["input_ids"][row, :n].cpu()} for row, n in enumerate(lengths)]
    out = prompt_collator(items)
    out["prompt_lengths"] = lengths
    return out


def sampled_items(prompts: dict[str, Any], response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[dict]:
    """SFT items ``{input_ids, labels}`` (CPU) of prompt + sampled response, one per row.

    response_ids, response_mask [B, L] (mask 1 up to and including the first EOS) → B items whose labels cover
    exactly the valid response tokens.
    """
    items = []
    ids, mask = response_ids.cpu(), response_mask.cpu()
    for row, n_prompt in enumerate(prompts["prompt_lengths"]):
        prompt = prompts["input_ids"][row, prompts["input_ids"].shape[1] - n_prompt:]
        n_response = int(mask[row].sum())
        items.append(sft_item(torch.cat([prompt, ids[row, :n_response]]).tolist(), n_prompt))
    return items


class ReplayBuffer:
    """FIFO store of SFT items (CPU tensors), ``capacity`` items at most; the oldest are evicted first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.items: deque = deque(maxlen=self.capacity)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.capacity

    def push(self, items: list[dict]) -> None:
        self.items.extend({k: v.clone() for k, v in it.items()} for it in items)

    def sample(self, count: int, generator: torch.Generator) -> list[dict]:
        """``count`` distinct items, uniformly at random (``generator`` decides)."""
        if count > len(self.items):
            raise ValueError(f"replay buffer holds {len(self.items)} sequences, fewer than the {count} requested")
        order = torch.randperm(len(self.items), generator=generator)[:count].tolist()
        return [self.items[i] for i in order]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "items": [dict(it) for it in self.items]}

    def load_state_dict(self, state: dict) -> None:
        if int(state["capacity"]) != self.capacity:
            from ..errors import CheckpointError

            raise CheckpointError(f"replay buffer saved with capacity {state['capacity']}, configured {self.capacity}; "
                             "exact resume needs the same kd.replay_capacity")
        self.items = deque(({k: v for k, v in it.items()} for it in state["items"]), maxlen=self.capacity)


class AdaptiveSchedule:
    """DistiLLM's adaptive probability of student-generated data (module docstring)."""

    def __init__(self, init: float, step: float, loss_eps: float, replay_ratio: str) -> None:
        self.threshold = float(init)
        self.step_size, self.loss_eps, self.replay_ratio = float(step), float(loss_eps), replay_ratio
        self.reference_loss: float | None = None

    def fresh_share(self, step: int, total_steps: int) -> float:
        """s = threshold × ratio(step): the probability of fresh samples once the buffer is full."""
        progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
        ratio = {"constant": 0.5, "increasing": progress, "decreasing": 1.0 - progress}[self.replay_ratio]
        return self.threshold * ratio

    def choose(self, u: float, step: int, total_steps: int, buffer_full: bool) -> str:
        if u < self.fresh_share(step, total_steps) or (u < self.threshold and not buffer_full):
            return FRESH
        return REPLAY if u < self.threshold else FIXED

    def observe(self, dev_loss: float) -> None:
        """A new dev loss: raise the threshold if it is ``loss_eps`` above the loss at the last raise."""
        if self.reference_loss is None:
            self.reference_loss = float(dev_loss)
        elif dev_loss >= self.reference_loss + self.loss_eps:
            self.threshold = min(self.threshold + self.step_size, 1.0)
            self.reference_loss = float(dev_loss)

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "reference_loss": self.reference_loss}

    def load_state_dict(self, state: dict) -> None:
        self.threshold, self.reference_loss = float(state["threshold"]), state["reference_loss"]


class StudentData:
    """The batch-preparation step of ``SFTTrainer`` for GKD / DistiLLM (module docstring).

    ``sample_fn(prompt_ids, prompt_mask, generator) -> (response_ids, response_mask)`` draws the student's
    responses; the trainer supplies it (gathering ZeRO-3 parameters around :func:`mixed_sample`), tests may pass
    their own. ``total_steps`` drives DistiLLM's replay ratio.
    """

    def __init__(self, kd_cfg, *, seed: int, rank: int, micro_batch_size: int, total_steps: int,
                 sft_collator: Callable, prompt_collator: Callable, sample_fn: Callable) -> None:
        self.cfg = kd_cfg
        self.seed, self.rank = int(seed), int(rank)
        self.micro_batch_size, self.total_steps = int(micro_batch_size), int(total_steps)
        self.sft_collator, self.prompt_collator, self.sample_fn = sft_collator, prompt_collator, sample_fn
        self.schedule = AdaptiveSchedule(kd_cfg.adaptive_init, kd_cfg.adaptive_step, kd_cfg.adaptive_loss_eps,
                                         kd_cfg.replay_ratio) if kd_cfg.adaptive_off_policy else None
        self.buffer = ReplayBuffer(kd_cfg.replay_capacity) if kd_cfg.adaptive_off_policy else None
        self.counter = 0  # micro-batches prepared so far: the only source of randomness besides the seed
        self.counts = {FIXED: 0, FRESH: 0, REPLAY: 0}  # since the last log_values()

    @staticmethod
    def active(kd_cfg) -> bool:
        return kd_cfg.on_policy_fraction > 0 or kd_cfg.adaptive_off_policy

    def _coin_generator(self) -> torch.Generator:
        # Same on every rank: the coin (and the replay draw) must agree across ranks.
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.counter * 7919 + 17)

    def choose(self, step: int) -> tuple[str, torch.Generator]:
        """The source of the next micro-batch and the generator to draw replayed items with."""
        g = self._coin_generator()
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        if self.schedule is not None:
            return self.schedule.choose(u, step, self.total_steps, self.buffer.full), g
        return (FRESH if u < self.cfg.on_policy_fraction else FIXED), g

    def sample(self, batch: dict[str, torch.Tensor]) -> list[dict]:
        """Student responses for the prompts of ``batch`` as SFT items (CPU)."""
        prompts = split_prompts(batch, self.prompt_collator)
        device = batch["input_ids"].device
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed * 1_000_003 + self.counter * 7919 + self.rank * 104_729 + 29)
        response_ids, response_mask = self.sample_fn(prompts["input_ids"].to(device),
                                                     prompts["attention_mask"].to(device), generator)
        return sampled_items(prompts, response_ids, response_mask)

    def prepare(self, batch: dict[str, torch.Tensor], step: int) -> tuple[dict[str, torch.Tensor], str]:
        """The micro-batch to train on (on ``batch``'s device) and its source: "data", "student" or "replay"."""
        source, g = self.choose(step)
        if source == FRESH:
            items = self.sample(batch)
            if self.buffer is not None:
                self.buffer.push(items)
        elif source == REPLAY:
            items = self.buffer.sample(self.micro_batch_size, g)
        self.counter += 1
        self.counts[source] += 1
        if source == FIXED:
            return batch, source
        device = batch["input_ids"].device
        return {k: v.to(device) for k, v in self.sft_collator(items).items()}, source

    def observe_dev_loss(self, dev_loss: float) -> None:
        if self.schedule is not None:
            self.schedule.observe(dev_loss)

    def log_values(self) -> dict[str, float]:
        """Shares of the micro-batches since the last call by source, and the adaptive threshold."""
        total = max(1, sum(self.counts.values()))
        values = {"train/student_data_fraction": self.counts[FRESH] / total}
        if self.schedule is not None:
            values["train/replay_fraction"] = self.counts[REPLAY] / total
            values["train/off_policy_threshold"] = self.schedule.threshold
            values["train/replay_buffer_size"] = float(len(self.buffer))
        self.counts = {k: 0 for k in self.counts}
        return values

    def state_dict(self) -> dict:
        return {"counter": self.counter, "counts": dict(self.counts),
                "schedule": self.schedule.state_dict() if self.schedule is not None else None,
                "buffer": self.buffer.state_dict() if self.buffer is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.counter, self.counts = int(state["counter"]), {k: int(v) for k, v in state["counts"].items()}
        if self.schedule is not None:
            if state["schedule"] is None:
                from ..errors import CheckpointError

                raise CheckpointError("checkpoint has no adaptive off-policy state but kd.adaptive_off_policy is on")
            self.schedule.load_state_dict(state["schedule"])
            self.buffer.load_state_dict(state["buffer"])


def student_sampler(student, strategy, tokenizer, kd_cfg) -> Callable:
    """``sample_fn`` for :class:`StudentData`: pure student samples (α = 0) with the ``kd.student_*`` settings."""

    def sample(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, generator: torch.Generator):
        with strategy.sampling_model(student) as module, strategy.autocast():
            out = mixed_sample(module, None, prompt_ids, prompt_mask, max_new_tokens=kd_cfg.student_max_new_tokens,
                               alpha=0.0, temperature=kd_cfg.student_temperature, top_k=kd_cfg.student_top_k,
                               top_p=kd_cfg.student_top_p, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, generator=generator)
        return out.response_ids, out.response_mask

    return sample
