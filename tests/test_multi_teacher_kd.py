"""Multi-teacher routing in the word-level trainers (kd, and GKD's student samples; minillm.routing): every
micro-batch of an optimizer step comes from the records of one teacher, its KD term is that teacher's (equal to a
single-teacher run with it), and an interrupted run resumes to the same weights and metrics."""

from __future__ import annotations

import pytest
import torch

from minillm.config import load_config
from minillm.data.records import load_records

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHERS = ["teacher.path=", "teachers=[{name: language, path: tests/assets/teacher}, "
            "{name: facts, path: tests/assets/teacher-b}]", "routing.routes={language: language, facts: facts}",
            "data.train=tests/assets/data/routed.jsonl"]
SMALL = ["train.max_steps=6", "train.eval_interval=0", "train.save_interval=0", "logging.log_interval=1",
         "train.select_best_by=none", "eval.rouge=false"]


def _trainer(cfg):
    from minillm.checkpoint import seed_everything
    from minillm.cli.train import build_trainer
    from minillm.strategy import build_strategy

    strategy = build_strategy(cfg).setup()
    seed_everything(cfg.seed)
    return build_trainer(cfg, strategy)


@pytest.mark.parametrize("extra", [[], ["kd.on_policy_fraction=1.0", "kd.student_max_new_tokens=6"]],
                         ids=["kd", "gkd"])
def test_each_step_uses_one_teachers_records_and_its_kd_term(tmp_path, extra):
    cfg = load_config("configs/tiny/kd.yaml", [*SMALL, *TEACHERS, *extra, f"output_dir={tmp_path / 'multi'}"])
    trainer = _trainer(cfg)
    sources = [r.fields["source"] for r in load_records(cfg.data.train)]
    names = trainer.router.names
    singles = {name: _trainer(load_config("configs/tiny/kd.yaml", [
        *SMALL, *extra, f"teacher.path=tests/assets/{'teacher' if name == 'language' else 'teacher-b'}",
        "data.train=tests/assets/data/routed.jsonl", f"output_dir={tmp_path / name}"])) for name in names}
    batches = trainer._micro_batches()
    seen = set()
    for step in range(2):  # seed 10: steps 0 and 1 have different teachers
        trainer.step = step
        for _ in range(cfg.train.gradient_accumulation_steps):
            batch = next(batches)
            teacher = trainer.router.teacher_of_phase(step)
            name = names[teacher]
            seen.add(name)
            assert trainer.teacher is trainer.router.models[teacher]
            assert {sources[trainer.data.train_prompts.indices[int(i)]] for i in batch["index"]} == {name}
            if trainer.student_data is not None:  # GKD: the student's samples for this step's own prompts
                torch.manual_seed(step)
                batch, _ = trainer.student_data.prepare(batch, step)
            with torch.no_grad():
                loss, parts = trainer.compute_loss(batch)
                single, single_parts = singles[name].compute_loss(batch)  # the same student weights, one teacher
                other, _ = singles[names[1 - teacher]].compute_loss(batch)
            assert float(loss) == pytest.approx(float(single), abs=1e-6)
            assert abs(float(loss) - float(other)) > 1e-4  # the other teacher's KD term differs (100x the tolerance)
    assert seen == set(names)


def test_kd_resume_equals_the_uninterrupted_run(tmp_path):
    from test_preemption import assert_same_run, rows

    from minillm.cli.train import run

    def cfg(out, *more):
        return load_config("configs/tiny/kd.yaml", [*SMALL, *TEACHERS, f"output_dir={out}", *more])

    full, parted = tmp_path / "full", tmp_path / "parted"
    assert run(cfg(full)) == 0
    assert run(cfg(parted, "train.stop_at_step=3")) == 0
    assert run(cfg(parted), resume="latest") == 0
    assert_same_run(full, parted)
    last = rows(full)[-1]
    assert last["teacher/language/routed_records"] + last["teacher/facts/routed_records"] == 6 * 8
    assert last["teacher/language/routed_records"] > 0 and last["teacher/facts/routed_records"] > 0
