"""Bad inputs to every CLI (issue 18 item 6): one line ``minillm-<cmd>: error: <what, where, how>``, exit status 2,
no traceback, and nothing already on disk (checkpoints, data, metrics) lost or changed. In-process through
``minillm.cli.run_console``, exactly as the console scripts run (its final ``os._exit`` replaced by SystemExit)."""

import hashlib
import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from minillm.cli import run_console

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ["--config", "configs/tiny/sft.yaml", "train.max_steps=2", "train.eval_interval=0", "train.save_interval=1"]


@pytest.fixture(scope="module")
def precious(tmp_path_factory):
    """A finished run (checkpoints, metrics, final/), data files and a packed corpus that no failing command may
    touch, plus broken inputs to feed the commands."""
    from minillm.cli.train import run
    from minillm.config import load_config

    root = tmp_path_factory.mktemp("precious")
    assert run(load_config(TRAIN[1], [*TRAIN[2:], f"output_dir={root / 'run'}"])) == 0
    data = root / "data"
    data.mkdir()
    shutil.copy("tests/assets/data/train.jsonl", data / "train.jsonl")
    (data / "malformed.jsonl").write_text('{"instruction": "Add 1 and 2.", "output": "3"}\n{"instruction": \n')
    (data / "nofields.jsonl").write_text('{"question": "Add 1 and 2.", "answer": "3"}\n' * 40)
    (data / "empty.jsonl").write_text("")
    (data / "few.jsonl").write_text(''.join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) + "\n"
                                            for i in range(3)))
    (root / "bad.yaml").write_text("method: sft\nstudent: {path: tests/assets/student\n")
    (root / "a-file").write_text("not a folder\n")
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Content hashes of every file under root; train.log may only grow (each run appends to it)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "train.log"}


def console(monkeypatch, command: str, *args: str) -> int:
    """Run ``minillm-<command> args`` as its console script does; return its exit status."""
    import minillm.runtime as runtime

    def exit_now(code, grace_s=0.0):
        raise SystemExit(code)

    monkeypatch.setattr(runtime, "exit_now", exit_now)  # the real one ends the interpreter (os._exit)
    monkeypatch.setattr(sys, "argv", [f"minillm-{command}", *args])
    monkeypatch.delenv("MINILLM_DEBUG", raising=False)
    main = importlib.import_module(f"minillm.cli.{command.replace('-', '_')}").main
    with pytest.raises(SystemExit) as stop:
        run_console(main)
    return stop.value.code


P = "{P}"  # replaced by the precious folder
CASES = [
    # minillm-train: config
    ("train", ["--config", "configs/tiny/nope.yaml"], "nope.yaml"),
    ("train", ["--config", "/absolute/path/missing.yaml"], "config file `/absolute/path/missing.yaml` does not exist"),
    ("train", ["--config", f"{P}/bad.yaml"], "invalid YAML"),
    ("train", [*TRAIN, "train.max_stepz=3"], "unknown key `train.max_stepz`"),
    ("train", [*TRAIN, "train.micro_batch_size=3"], "train.global_batch_size"),
    ("train", [*TRAIN, "train.max_time=soon"], "`train.max_time`: 'soon' is not a positive duration"),
    ("train", [*TRAIN, "optim.lr=-1"], "`optim.lr`: must be positive"),
    ("train", ["--config", "configs/tiny/kd.yaml", "teacher.path="], "`teacher.path`: is required"),
    ("train", [*TRAIN, "broken-override"], "expected key.sub=value"),
    # minillm-train: data
    ("train", [*TRAIN, f"output_dir={P}/run", f"data.train={P}/data/missing.jsonl"], "missing.jsonl"),
    ("train", [*TRAIN, f"output_dir={P}/run", f"data.train={P}/data/malformed.jsonl"], "malformed.jsonl"),
    ("train", [*TRAIN, f"output_dir={P}/run", f"data.train={P}/data/nofields.jsonl"], "nofields.jsonl"),
    ("train", [*TRAIN, f"output_dir={P}/run", f"data.train={P}/data/empty.jsonl"], "empty.jsonl"),
    ("train", [*TRAIN, f"output_dir={P}/run", f"data.train={P}/data/few.jsonl", "--no-preflight"],
     "training examples are fewer than one optimizer step"),
    # minillm-train: models, paths, checkpoints
    ("train", [*TRAIN, f"output_dir={P}/run", f"student.path={P}/no-model"], f"{P}/no-model` does not exist"),
    ("train", [*TRAIN, f"output_dir={P}/run", f"student.path={P}/no-model", "--no-preflight"],
     f"model folder `{P}/no-model` does not exist"),
    ("train", [*TRAIN, f"output_dir={P}/run", f"student.path={P}/a-file", "--no-preflight"], "is a file, not a model"),
    ("train", ["--config", "configs/tiny/kd.yaml", f"output_dir={P}/run", "train.max_steps=2",
               "teacher.path=tests/assets/teacher", "student.tokenizer=tests/assets/tokenizer", "--no-preflight",
               f"teacher.tokenizer={P}/no-tokenizer"], f"tokenizer folder `{P}/no-tokenizer` does not exist"),
    ("train", [*TRAIN, f"output_dir={P}/a-file"], "a-file"),
    ("train", [*TRAIN, f"output_dir={P}/fresh", "--resume"], "no complete checkpoint"),
    ("train", [*TRAIN, f"output_dir={P}/run", "--resume", f"{P}/data"], "neither a checkpoint folder"),
    ("train", [*TRAIN, f"output_dir={P}/run", "kd.teacher_cache=/no/cache"], "`kd.teacher_cache`: is read by"),
    ("train", ["--config", "configs/tiny/kd.yaml", "train.max_steps=2", f"output_dir={P}/run",
               "kd.teacher_cache=/no/cache", "--no-preflight"], "/no/cache"),
    ("train", ["--config", "configs/tiny/kd.yaml", "train.max_steps=2", f"output_dir={P}/run",
               f"kd.teacher_cache={P}/data"], "data` is not a teacher top-k cache (no teacher_topk.json); build it"),
    # minillm-check
    ("check", ["--config", "configs/tiny/missing.yaml"], "missing.yaml"),
    ("check", ["--config", "configs/tiny/kd.yaml", f"teacher.path={P}/no-teacher"], f"{P}/no-teacher"),
    ("check", ["train.max_steps=3"], "key=value overrides go with --config"),
    # minillm-eval
    ("eval", ["--model", f"{P}/no-model", "--data", f"{P}/data/train.jsonl", "--out", f"{P}/eval", "--num", "2"],
     f"model folder `{P}/no-model` does not exist"),
    ("eval", ["--model", "tests/assets/student", "--data", f"{P}/data/missing.jsonl", "--out", f"{P}/eval"],
     "missing.jsonl"),
    ("eval", ["--config", f"{P}/no-eval.yaml"], "no-eval.yaml"),
    ("eval", ["--model", "tests/assets/student", "--data", f"{P}/data/train.jsonl", "--out", f"{P}/run/final",
              "--seeds"], "seeds"),
    # minillm-generate
    ("generate", ["--model", f"{P}/no-model", "--data", f"{P}/data/train.jsonl", "--out", f"{P}/gen.jsonl"],
     f"model folder `{P}/no-model` does not exist"),
    ("generate", ["--model", "tests/assets/student", "--data", f"{P}/data/nofields.jsonl", "--out",
                  f"{P}/gen.jsonl"], "nofields.jsonl"),
    # minillm-data
    ("data", ["--tokenizer", f"{P}/no-tokenizer", "--train", f"{P}/data/train.jsonl", "--out", f"{P}/prepared"],
     f"`{P}/no-tokenizer` does not exist"),
    ("data", ["--tokenizer", "tests/assets/tokenizer", "--train", f"{P}/data/nofields.jsonl", "--out",
              f"{P}/prepared"], "nofields.jsonl"),
    ("data", ["--tokenizer", "tests/assets/tokenizer", "--train", f"{P}/data/missing.jsonl", "--out",
              f"{P}/prepared"], "missing.jsonl"),
    # minillm-teacher-cache
    ("teacher-cache", ["--corpus", f"{P}/no-corpus", "--teacher", "tests/assets/teacher", "--out", f"{P}/tc"],
     "no-corpus"),
    ("teacher-cache", ["--corpus", f"{P}/no-corpus", "--out", f"{P}/tc"], "--corpus needs --teacher"),
    ("teacher-cache", ["--config", "configs/tiny/missing.yaml", "--out", f"{P}/tc"], "missing.yaml"),
    # minillm-compare
    ("compare", ["--methods", "sft", "nonsense", "--pair", "tiny", "--data", f"{P}/data/train.jsonl", "--out",
                 f"{P}/cmp"], "nonsense"),
    ("compare", ["--methods", "sft", "--pair", "no-such-pair", "--data", f"{P}/data/train.jsonl", "--out",
                 f"{P}/cmp"], "no-such-pair"),
    # minillm-bench
    ("bench", ["--output", f"{P}/a-file/result.json"], "a-file"),
]


@pytest.mark.parametrize("command, args, expected", CASES,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(command, args, expected, precious, monkeypatch, capsys):
    args = [a.replace(P, str(precious)) for a in args]
    expected = expected.replace(P, str(precious))
    before = snapshot(precious)
    log_before = (precious / "run" / "train.log").read_text()
    code = console(monkeypatch, command, *args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"minillm-{command}: error: ")]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    assert expected in errors[0], err
    assert snapshot(precious) == before, "a failing command changed files on disk"
    assert (precious / "run" / "train.log").read_text().startswith(log_before)


def test_minillm_debug_shows_the_traceback(precious, monkeypatch, capsys):
    monkeypatch.setenv("MINILLM_DEBUG", "1")
    import minillm.runtime as runtime

    monkeypatch.setattr(runtime, "exit_now", lambda code, grace_s=0.0: (_ for _ in ()).throw(SystemExit(code)))
    monkeypatch.setattr(sys, "argv", ["minillm-eval", "--model", f"{precious}/no-model", "--data",
                                      f"{precious}/data/train.jsonl", "--out", f"{precious}/eval"])
    from minillm.cli.eval import main

    with pytest.raises(SystemExit) as stop:
        run_console(main)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Traceback" in err and "does not exist" in err


def test_train_overrides_may_follow_flags(capsys):
    """`minillm-train --config X --dry-run key=value` (and after --resume DIR) was an argparse error."""
    from minillm.cli.train import main

    assert main(["--config", "configs/tiny/sft.yaml", "--dry-run", "train.max_steps=3", "--no-preflight",
                 "optim.lr=0.25"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "lr: 0.25" in out
