"""Graceful stops (issue 18): SIGTERM/SIGINT/SIGUSR1 and train.max_time checkpoint the exact position and exit 75;
resuming ends with the same weights and metrics rows as an uninterrupted run, bitwise on CPU. A full disk during a
checkpoint keeps the previous one complete. In-process runs (minillm.cli.train.run) on the tiny assets."""

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from minillm.checkpoint import list_checkpoints
from minillm.cli.train import run
from minillm.config import load_config
from minillm.trainers.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.usefixtures("one_thread")

# Small runs: sft-family 6 steps (signal mid-way), minillm 6 steps = 1.5 phases of 4 (signal inside a PPO epoch)
SFT_FAMILY = ["train.max_steps=6", "train.save_interval=4", "train.eval_interval=3", "eval.num_prompts=4",
              "eval.max_new_tokens=6", "logging.log_interval=1", "data.max_length=160", "train.select_best_by=loss"]
STUDENT_DATA = ["kd.student_max_new_tokens=8"]
MINILLM = ["train.max_steps=6", "train.save_interval=0", "train.eval_interval=5", "eval.num_prompts=4",
           "eval.max_new_tokens=6", "logging.log_interval=1", "rollout.max_new_tokens=8", "rollout.num_rollouts=16",
           "rollout.chunk_size=8", "train.micro_batch_size=4", "train.global_batch_size=8", "data.pretrain=null"]
METHODS = {"sft": SFT_FAMILY, "kd": SFT_FAMILY, "seqkd": SFT_FAMILY, "gkd": SFT_FAMILY + STUDENT_DATA,
           "distillm": SFT_FAMILY + STUDENT_DATA + ["train.eval_at_start=false"], "minillm": MINILLM}


def config(method, out, *extra):
    return load_config(f"configs/tiny/{method}.yaml", [*METHODS[method], f"output_dir={out}", *extra])


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/") and "per_s" not in k}
            for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def final_weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "model.safetensors"))


def assert_same_run(a, b):
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs after the interrupted run was resumed"
    assert rows(a) == rows(b)


_uninterrupted: dict[str, Path] = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of a method, made once per module."""

    def get(method):
        if method not in _uninterrupted:
            out = tmp_path_factory.mktemp(f"full-{method}")
            assert run(config(method, out)) == 0
            _uninterrupted[method] = out
        return _uninterrupted[method]

    yield get
    _uninterrupted.clear()


def signal_at(monkeypatch, step, signum=signal.SIGTERM, again=None):
    """Deliver ``signum`` to this process during the first micro-step after optimizer step ``step`` (inside an
    accumulation window); ``again``: a second signal in the middle of the checkpoint save that follows."""
    import minillm.trainers.minillm as minillm_trainer
    import minillm.trainers.sft as sft_trainer
    from minillm.strategy import LocalStrategy

    sent = []
    for module in (sft_trainer, minillm_trainer):
        original = module.guarded_micro_step

        def micro_step(trainer, *args, _original=original, **kwargs):
            if trainer.step == step and not sent:
                sent.append(step)
                os.kill(os.getpid(), signum)
            return _original(trainer, *args, **kwargs)

        monkeypatch.setattr(module, "guarded_micro_step", micro_step)
    if again is not None:
        save = LocalStrategy.save_checkpoint

        def save_and_signal(self, directory, tokenizer):
            os.kill(os.getpid(), again)  # handled (ignored) between the weights and the optimizer file
            return save(self, directory, tokenizer)

        monkeypatch.setattr(LocalStrategy, "save_checkpoint", save_and_signal)
    return sent


@pytest.mark.parametrize("method, signum", [("sft", signal.SIGTERM), ("kd", signal.SIGINT),
                                            ("seqkd", signal.SIGUSR1), ("gkd", signal.SIGTERM),
                                            ("distillm", signal.SIGUSR1), ("minillm", signal.SIGTERM)])
def test_signal_checkpoints_the_exact_position_and_resume_equals_uninterrupted(method, signum, reference, tmp_path,
                                                                               monkeypatch):
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)]
    sent = signal_at(monkeypatch, 2, signum)
    out = tmp_path / "parted"
    assert run(config(method, out)) == EXIT_PREEMPTED
    assert sent == [2]
    # the optimizer step in progress was finished, then step 3 checkpointed: mid-phase for minillm (phase of 4)
    assert [step for step, _ in list_checkpoints(out)] == [3]
    assert not (out / "final").exists()
    assert [r["step"] for r in rows(out) if "train/loss" in r] == [1, 2, 3]
    if method == "minillm":
        assert (out / "checkpoints" / "step-3" / "rollout-rank0.pt").is_file()  # the phase's buffer
    # the handlers are restored: a later SIGTERM in this process would again terminate it
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)] == handlers
    monkeypatch.undo()
    assert run(config(method, out), resume="auto") == 0
    assert_same_run(reference(method), out)


def test_a_signal_during_a_rollout_stops_between_generation_batches(reference, tmp_path, monkeypatch):
    """The second phase samples 16 rollouts in 2 generation batches of 8; SIGTERM during the first batch stops
    before the second (not after the whole phase and a step): the checkpoint is the phase start, step 4, with
    the prompt cursor and RNG of that moment, and resuming reproduces the uninterrupted run."""
    from minillm.trainers.minillm import MiniLLMTrainer

    calls = []
    original = MiniLLMTrainer._sample

    def sample(self, *args, **kwargs):
        calls.append(self.phase)
        if self.phase == 1 and calls.count(1) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MiniLLMTrainer, "_sample", sample)
    out = tmp_path / "parted"
    assert run(config("minillm", out)) == EXIT_PREEMPTED
    assert calls == [0, 0, 1]  # the second generation batch of phase 1 never ran
    assert [step for step, _ in list_checkpoints(out)] == [4]
    assert not (out / "checkpoints" / "step-4" / "rollout-rank0.pt").exists()
    monkeypatch.undo()
    assert run(config("minillm", out), resume="auto") == 0
    assert_same_run(reference("minillm"), out)


def test_a_second_signal_during_the_save_is_ignored_and_the_checkpoint_is_complete(reference, tmp_path, monkeypatch,
                                                                                   capfd):
    signal_at(monkeypatch, 1, signal.SIGTERM, again=signal.SIGINT)
    out = tmp_path / "parted"
    assert run(config("minillm", out)) == EXIT_PREEMPTED
    assert "received again: already stopping" in capfd.readouterr().err
    assert [step for step, _ in list_checkpoints(out)] == [2]
    monkeypatch.undo()
    assert run(config("minillm", out), resume="auto") == 0
    assert_same_run(reference("minillm"), out)


def test_max_time_stops_before_the_budget_with_an_exact_checkpoint(reference, tmp_path, monkeypatch):
    """A fake clock at 10 s per optimizer step, the process started at 0, a 65 s budget: with no save timed yet a
    save is estimated at one step, so the run stops at the first boundary where 10·k + 1.5 x (10 + 10) >= 65: k = 4
    (the periodic step-4 checkpoint is that exact position), and exits 75."""
    import minillm.trainers.preemption as preemption
    import minillm.trainers.sft as sft_trainer

    now = [0.0]
    original = sft_trainer.guarded_micro_step

    def micro_step(trainer, *args, **kwargs):
        now[0] = 10.0 * (trainer.step + 1)  # the step being computed ends at this time
        return original(trainer, *args, **kwargs)

    monkeypatch.setattr(sft_trainer, "guarded_micro_step", micro_step)
    monkeypatch.setattr(preemption, "_clock", lambda: now[0])
    monkeypatch.setattr(preemption, "process_age", lambda: 0.0)
    out = tmp_path / "parted"
    assert run(config("sft", out, "train.max_time=0:01:05")) == EXIT_PREEMPTED
    assert [step for step, _ in list_checkpoints(out)] == [4]
    assert not (out / "final").exists()
    monkeypatch.undo()
    assert run(config("sft", out), resume="auto") == 0
    assert_same_run(reference("sft"), out)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    """ENOSPC while the step-4 checkpoint is written: step-2 stays complete (and is not pruned), the half-written
    folder is removed, the error is one clear line, and resuming from step-2 reproduces the uninterrupted run."""
    from minillm.cli import is_user_error
    from minillm.errors import CheckpointError
    import minillm.trainers.common as common

    steps = ["train.save_interval=2", "train.keep_checkpoints=1", "train.eval_interval=0"]
    full = tmp_path / "full"
    assert run(config("sft", full, *steps)) == 0
    out = tmp_path / "parted"
    real_save = common.save_trainer_state

    def save_trainer_state(directory, state, is_main):
        if state["step"] == 4:
            (directory / "partial.bin").write_bytes(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "trainer_state.pt"))
        return real_save(directory, state, is_main)

    monkeypatch.setattr(common, "save_trainer_state", save_trainer_state)
    with pytest.raises(CheckpointError) as failure:
        run(config("sft", out, *steps))
    message = str(failure.value)
    assert "No space left on device" in message and "step-4" in message
    assert f"{out / 'checkpoints' / 'step-2'} is still complete" in message and "--resume auto" in message
    assert is_user_error(failure.value)  # minillm-train prints it as one line and exits 2
    assert [step for step, _ in list_checkpoints(out)] == [2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]  # no half-written folder left
    monkeypatch.undo()
    assert run(config("sft", out, *steps), resume="auto") == 0
    a, b = final_weights(full), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows(full) == rows(out)


def test_resume_drops_metrics_rows_past_the_checkpoint_and_a_line_torn_by_a_kill(tmp_path):
    """kill -9 in the middle of a metrics write leaves a torn last line, and the next append glues its row onto it;
    resume must drop both (they are past the checkpoint) instead of failing on them or keeping duplicates."""
    from minillm.config import LoggingConfig
    from minillm.tracking import MetricsLogger, read_metrics

    logger = MetricsLogger(tmp_path, LoggingConfig(progress_bar=False), is_main=True)
    for step in (1, 2, 3, 4):
        logger.log(step, {"train/loss": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "train/lo')  # torn by the kill
    logger.truncate_after(3)
    assert read_metrics(tmp_path) == [{"step": s, "train/loss": float(s)} for s in (1, 2, 3)]
    logger.log(4, {"train/loss": 4.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_pruning_never_leaves_a_half_deleted_checkpoint_that_resume_would_take(tmp_path, monkeypatch):
    """A kill while an old checkpoint is deleted: rmtree removes files in no set order, and a step folder that still
    had trainer_state.pt but no weights was taken as complete. Pruning renames it away first; keep=0 still keeps
    the newest."""
    import shutil

    from minillm import checkpoint

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"step-{step}").mkdir(parents=True)
        (root / f"step-{step}" / "model.safetensors").write_bytes(b"w")
        (root / f"step-{step}" / "trainer_state.pt").write_bytes(b"s")
    real_rmtree = shutil.rmtree

    def killed_rmtree(path, ignore_errors=False):  # the kill: weights gone, trainer state still there
        if not Path(path).exists():
            return
        (Path(path) / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prune_checkpoints(tmp_path, 1, is_main=True)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]  # step-2 is out of the step-N namespace
    assert all((p / "model.safetensors").is_file() for _, p in list_checkpoints(tmp_path))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    checkpoint.prune_checkpoints(tmp_path, 0, is_main=True)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6]
    assert sorted(p.name for p in root.iterdir()) == ["step-6"]  # the leftover of the killed prune is gone


def test_max_time_reads_slurm_durations_and_unquoted_yaml():
    from minillm.config import ConfigError, parse_duration

    assert [parse_duration(t) for t in ("3:55:00", "55:00", "90", "1-02:00:00")] == [14100, 3300, 90, 93600]
    # unquoted in YAML, 3:55:00 arrives as the base-60 integer 14100: the same seconds
    assert load_config("configs/tiny/sft.yaml", ["train.max_time=3:55:00"]).train.max_time_seconds() == 14100
    assert load_config("configs/tiny/sft.yaml", ['train.max_time="3:55:00"']).train.max_time_seconds() == 14100
    assert load_config("configs/tiny/sft.yaml").train.max_time_seconds() is None
    for bad in ("soon", "0:00:00", '"1:2:3:4"', "-5"):
        with pytest.raises(ConfigError, match="train.max_time"):
            load_config("configs/tiny/sft.yaml", [f"train.max_time={bad}"])
