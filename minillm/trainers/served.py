"""What the trainers do about a served teacher (``teacher.server``) that stops answering.

:class:`minillm.serve.client.TeacherServerUnavailable` comes out of a micro-step's teacher call, after the client's
retries. The run then stops like a preempted one (:mod:`minillm.trainers.preemption`): a checkpoint of the exact
position, exit status 75, ``--resume auto`` once the server is back. A checkpoint is exact only at an optimizer-step
boundary (half-accumulated gradients are not part of one), so the trainer records the data cursor, the RNG and the
metrics window when a step starts (:func:`mark_step_start`), and on the failure rewinds to them, provided no
micro-batch of the step has been backpropagated yet (always so without gradient accumulation). Otherwise no new
checkpoint is written and the error names the newest one, which ``--resume auto`` continues from.
"""

from __future__ import annotations

import copy
from typing import Any

from ..checkpoint import latest_checkpoint, rng_state, set_rng_state
from ..serve.client import TeacherServerUnavailable
from ..tracking import get_logger

log = get_logger()

__all__ = ["TeacherServerUnavailable", "mark_step_start", "stop_for_teacher_server", "next_micro_batch",
           "learn_or_stop"]


def next_micro_batch(sampler, dataset, collate, size: int):
    """The micro-batch a drop-last data loader over ``sampler`` yields next, read without moving the cursor (for
    a served teacher's prefetch); None when the epoch has fewer than ``size`` indices left."""
    indices = sampler.epoch_indices()[sampler.position: sampler.position + size]
    return collate([dataset[i] for i in indices]) if len(indices) == size else None


def mark_step_start(trainer, samplers: dict[str, Any]) -> None:
    """Remember the position a checkpoint written now would have (``samplers``: name → object with
    ``state_dict``/``load_state_dict``), before the step's first micro-batch is drawn."""
    trainer._step_start = {"rng": rng_state(), "window": copy.deepcopy(trainer.window.state_dict()),
                           "samplers": {name: (s, copy.deepcopy(s.state_dict())) for name, s in samplers.items()}}


def stop_for_teacher_server(trainer, error: TeacherServerUnavailable, micro_done: int) -> dict[str, Any]:
    """Rewind to the step start and checkpoint it, then return the trainers' ``stopped`` result; re-raise the error
    (naming the newest checkpoint) when the step is half accumulated (``micro_done`` > 0) or was never marked."""
    start = getattr(trainer, "_step_start", None)
    if start is None or micro_done > 0:
        newest = latest_checkpoint(trainer.output_dir)
        where = f"continue from {newest} with --resume auto" if newest else "no checkpoint was written yet"
        log.error("teacher.server unavailable in the middle of an optimizer step (%d micro-batches accumulated): "
                  "no exact checkpoint of this position is possible; %s", micro_done, where)
        raise error
    set_rng_state(start["rng"])
    trainer.window.load_state_dict(start["window"])
    for sampler, state in start["samplers"].values():
        sampler.load_state_dict(state)
    reason = f"teacher.server unavailable: {error}"
    log.error("%s; writing a checkpoint of step %d and stopping (resume with --resume auto once the server is back)",
              reason, trainer.step)
    if getattr(trainer, "saved_step", None) != trainer.step:
        trainer.save()
    trainer.metrics.close()
    return {"step": trainer.step, "stopped_early": True, "stopped": reason}


def learn_or_stop(trainer, perm):
    """MiniLLM's ``learn_micro_step(perm)`` with a served teacher's failure turned into a checkpoint and a stop:
    the StepResult, or the stopped result (a dict) that ``_train`` returns. The PT loss's corpus cursor is the
    only data a learning micro-step draws; the rollout buffer and PPO position are part of the checkpoint."""
    if not getattr(trainer.teacher, "is_remote_teacher", False):
        return trainer.learn_micro_step(perm)
    done = getattr(trainer, "_micro_done", 0)
    if done == 0:
        mark_step_start(trainer, {"pt_sampler": trainer.pt_sampler} if trainer.use_pt else {})
    try:
        result = trainer.learn_micro_step(perm)
    except TeacherServerUnavailable as error:
        return stop_for_teacher_server(trainer, error, done)
    trainer._micro_done = 0 if result.stepped else done + 1
    return result


# ------------------------------------------------------------------------------ overlap (issue 22 item 3)
def served(teacher) -> bool:
    return getattr(teacher, "is_remote_teacher", False)


class ScoringPipeline:
    """MiniLLM's rollout scoring one generation chunk behind, with a served teacher: chunk k's teacher request is
    sent (prefetched) as soon as chunk k is generated and chunk k is scored after chunk k+1 is generated, so the
    server works while the student samples. Rollouts with a served teacher are pure student samples (α = 0) or
    speculative ones (the teacher's verifications are their own requests), and scoring draws no randomness, so the
    order changes no number. A colocated teacher scores each chunk at once, as before."""

    def __init__(self, teacher) -> None:
        self.teacher, self.parts, self._deferred = teacher, [], None

    def push(self, score, prompt_ids, prompt_mask, response_ids) -> None:
        """``score()``: the chunk's scoring (a Rollout); the rest: the chunk, as scoring sends it to the teacher."""
        if not served(self.teacher):
            self.parts.append(score())
            return
        from ..losses.heads import sequence_inputs

        self.teacher.prefetch(**sequence_inputs(prompt_ids, prompt_mask, response_ids))
        self._run_deferred()
        self._deferred = score

    def _run_deferred(self) -> None:
        if self._deferred is not None:
            score, self._deferred = self._deferred, None
            self.parts.append(score())

    def drain(self) -> list:
        self._run_deferred()
        return self.parts


def prefetch_pt_batches(trainer) -> None:
    """MiniLLM with a served teacher: send the PT batch this micro-step is about to draw (read from the sampler
    without moving its cursor) while the student's policy terms run, and the step's next micro-step's PT batch
    while this one learns. Never across an optimizer-step boundary: a server failure then surfaces at a step's first
    micro-batch, where :func:`stop_for_teacher_server` writes an exact checkpoint. A batch peeked wrongly (an epoch
    boundary) is just not claimed: the forward then asks the server itself."""
    from torch.utils.data import default_collate

    m, t = trainer.cfg.minillm, trainer.cfg.train
    teacher = trainer.pt_teacher
    if not (trainer.use_pt and trainer.pt_cache is None and m.pt_kd_ratio > 0 and served(teacher)):
        return
    size = m.pt_micro_batch_size if m.pt_micro_batch_size > 0 else t.micro_batch_size
    ahead = 2 if getattr(trainer, "_micro_done", 0) + 1 < t.gradient_accumulation_steps else 1
    sampler = trainer.pt_sampler
    indices = sampler.epoch_indices()[sampler.position: sampler.position + ahead * size]
    for start in range(0, len(indices) - size + 1, size):
        batch = default_collate([trainer.corpus[i] for i in indices[start: start + size]])
        teacher.prefetch(input_ids=batch["input_ids"])


def served_timings(teacher) -> dict[str, float]:
    """time/teacher_request, time/teacher_wait, teacher/hidden_fraction since the last call ({} when colocated)."""
    return teacher.pop_timings() if served(teacher) else {}
