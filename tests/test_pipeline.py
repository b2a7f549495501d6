"""scripts/pipeline.sh (Table 1, one command per row) and the table builder minillm.evaluation.table1.

The whole tiny chain takes 1-2 minutes on 2 CPU cores, so it is marked slow; the generate -> seqkd -> eval part is
also covered quickly by tests/test_generate_cli.py::test_generated_file_trains_seqkd_end_to_end. The option tests
use --dry-run (commands printed, nothing run) and take well under a second each.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from minillm.evaluation import paper_numbers, table1

REPO = Path(__file__).resolve().parent.parent


def _pipeline(*args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(["bash", "scripts/pipeline.sh", *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _commands(log: str) -> dict[str, str]:
    """step name -> the command printed under it."""
    lines = log.splitlines()
    return {line.split("] ", 1)[1]: lines[i + 1].strip() for i, line in enumerate(lines) if line.startswith("==> [")}


def _cells(table: str, label: str, method: str) -> list[str]:
    rows = [line for line in table.splitlines() if line.startswith(f"| {label} | {method} |")]
    assert len(rows) == 1, (label, method, table)
    return [c.strip() for c in rows[0].strip().strip("|").split("|")][2:]


def _entry(mean, std):
    return {"mean": {"rougeL": mean, "exact_match": 1.0}, "std": {"rougeL": std, "exact_match": 0.0}, "seeds": {}}


def _write(path, results, settings, mtime):
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"settings": settings, "results": results}))
    os.utime(path, (mtime, mtime))


# ================================================================================================ the table builder
def test_table_cells_merge_and_layout_from_hand_made_results(tmp_path):
    paper_era = {"preset": "paper", "seeds": [10, 20, 30, 40, 50], "dtype": "fp16"}
    _write(tmp_path / "llama-7b" / "eval" / "results.json",
           {"teacher": {"dolly": _entry(1.0, 0.0)},
            "SFT": {"dolly": _entry(23.456, 0.123), "uinst": _entry(18.0, 1.0), "extra": _entry(5.0, 0.5)},
            "MiniLLM": {"dolly": _entry(1.0, 0.0)}}, paper_era, 1_000)
    # a later single-row command: its MiniLLM replaces the older one
    _write(tmp_path / "llama-7b" / "eval-minillm" / "results.json",
           {"MiniLLM": {"dolly": _entry(24.049, 0.251), "self_inst": {"mean": {}, "std": {}}}},
           {"preset": "official-head", "seeds": [10], "dtype": "fp32"}, 2_000)
    # another student size; its teacher evaluation is the newest, so the teacher row is this one
    _write(tmp_path / "my-student" / "eval" / "results.json",
           {"teacher": {"dolly": _entry(29.912, 0.3)}, "KD": {"dolly": _entry(7.0, 0.25)}}, paper_era, 3_000)
    (tmp_path / "sft-teacher").mkdir()  # folders without evaluations are not students
    assert table1.find_students(tmp_path) == ["llama-7b", "my-student"]
    assert table1.main(["--runs", str(tmp_path), "--teacher", "llama-13b"]) == 0
    text = (tmp_path / "table1.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "# Table 1: LLaMA-7B, my-student distilled from LLaMA-13B"
    assert [line for line in lines if line.startswith("Ours")] == [
        "Ours (teacher, KD): my-student/eval/results.json, preset paper, seeds 10 20 30 40 50, dtype fp16.",
        "Ours (SFT): llama-7b/eval/results.json, preset paper, seeds 10 20 30 40 50, dtype fp16.",
        "Ours (MiniLLM): llama-7b/eval-minillm/results.json, preset official-head, seeds 10, dtype fp32."]
    table = lines[lines.index("| Model | Method | Dolly | SelfInst | Vicuna | S-NI | UnNI | extra |"):]
    assert [line.split(" | ")[:2] for line in table[2:]] == [
        ["| LLaMA-13B", "Teacher"]] + [["| LLaMA-7B", m] for m in ("SFT w/o KD", "KD", "SeqKD", "MiniLLM")] + [
        ["| my-student", m] for m in ("SFT w/o KD", "KD", "SeqKD", "MiniLLM")]
    assert table[2] == ("| LLaMA-13B | Teacher | 29.7 / ours 29.91 ± 0.30 | – / ours – | – / ours – | – / ours – "
                        "| 38.5 / ours – | – / ours – |")
    assert _cells(text, "LLaMA-7B", "SFT w/o KD") == [
        "26.3 / ours 23.46 ± 0.12", "20.8 / ours –", "17.5 / ours –", "32.4 / ours –", "35.8 / ours 18.00 ± 1.00",
        "– / ours 5.00 ± 0.50"]
    assert _cells(text, "LLaMA-7B", "KD") == ["– / ours –"] * 6  # no KD row in the paper's text, none evaluated
    assert _cells(text, "LLaMA-7B", "MiniLLM") == ["29.0 / ours 24.05 ± 0.25", "23.2 / ours –", "20.7 / ours –",
                                                   "35.5 / ours –", "40.2 / ours –", "– / ours –"]
    assert _cells(text, "my-student", "KD") == ["– / ours 7.00 ± 0.25"] + ["– / ours –"] * 5
    # one size only
    table1.main(["--runs", str(tmp_path), "--student", "my-student", "--out", str(tmp_path / "one.md")])
    assert (tmp_path / "one.md").read_text().splitlines()[0] == "# Table 1: my-student distilled from teacher"


def test_table_without_results_or_with_a_broken_file_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no results.json under"):
        table1.main(["--runs", str(tmp_path)])
    (tmp_path / "gpt2-base" / "eval").mkdir(parents=True)
    (tmp_path / "gpt2-base" / "eval" / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a minillm-eval results.json"):
        table1.main(["--runs", str(tmp_path)])


def test_paper_numbers_rows_have_one_value_per_set_and_unknown_rows_are_dashes():
    assert [s for s, _ in paper_numbers.PAPER_SETS] == ["dolly", "self_inst", "vicuna", "sinst", "uinst"]
    assert all(len(row) == 5 for rows in paper_numbers.ROUGE_L.values() for row in rows.values())
    assert paper_numbers.paper_rouge_l("gpt2-base", "MiniLLM") == (24.6, 13.2, 16.9, 25.3, 26.6)
    # Not recoverable from the paper as text: never filled in.
    assert paper_numbers.paper_rouge_l("gpt2-medium", "MiniLLM") == (None,) * 5
    assert paper_numbers.paper_rouge_l("gpt2-base", "KD") == (None,) * 5
    assert paper_numbers.paper_rouge_l("gpt2-xl", "Teacher") == (None,) * 5


# ================================================================================================ options (dry run)
def test_pipeline_help_and_bad_arguments():
    out = _pipeline("--help")
    assert "--tiny" in out.stdout and "--rows" in out.stdout and "--era" in out.stdout
    for args, message in ((["nosuch"], "--teacher and --student"), (["gpt2", "--era", "1999"], "--era must be"),
                          (["gpt2", "--rows", "kd sftt"], "unknown row 'sftt'")):
        out = _pipeline(*args, check=False)
        assert out.returncode == 2 and message in out.stderr, out.stderr


def test_paper_and_current_eras_print_their_recipes_and_presets(tmp_path):
    runs = tmp_path / "runs"
    for era_args in (["--paper"], []):  # paper is the default
        cmds = _commands(_pipeline("gpt2", "--dry-run", "--runs", runs, *era_args).stdout)
        assert list(cmds) == ["SFT teacher", "SFT student (the MiniLLM init and the 'SFT w/o KD' row)",
                              "SeqKD data: teacher samples on the training prompts", "KD baseline", "SeqKD baseline",
                              "MiniLLM", "evaluate: teacher SFT KD SeqKD MiniLLM", "Table 1: ours beside the paper's"]
        assert "--config configs/minillm/paper/gpt2-base.yaml" in cmds["MiniLLM"]
        assert f"student.path={runs}/gpt2-base/sft/best-loss" in cmds["MiniLLM"]  # init: best dev loss
        ev = cmds["evaluate: teacher SFT KD SeqKD MiniLLM"]
        assert "--preset paper" in ev and "--seeds 10 20 30 40 50" in ev
        assert "--data dolly self_inst vicuna sinst uinst" in ev
        s = runs / "gpt2-base"
        assert (f"--model {runs}/sft-teacher/best {s}/sft/best-rougeL {s}/kd/best-rougeL {s}/seqkd/best-rougeL "
                f"{s}/minillm/best --name teacher SFT KD SeqKD MiniLLM") in ev
        assert f"--out {s}/eval " in ev
        assert cmds["Table 1: ours beside the paper's"].endswith(f"--runs {runs} --out {runs}/table1.md --teacher gpt2-xl")
    cmds = _commands(_pipeline("opt", "--dry-run", "--runs", runs, "--era", "current").stdout)
    assert "--config configs/minillm/opt-1.3b.yaml" in cmds["MiniLLM"]
    assert "--preset official-head" in cmds["evaluate: teacher SFT KD SeqKD MiniLLM"]
    assert not runs.exists()  # a dry run writes nothing


def test_single_rows_need_their_prerequisites_and_skip_what_is_done(tmp_path):
    out = _pipeline("gpt2", "--rows", "minillm", "--runs", tmp_path, check=False)
    assert out.returncode == 2 and "the SFT teacher is not there yet" in out.stderr
    assert "--rows \"teacher minillm\"" in out.stderr and "==> [" not in out.stdout
    # A finished teacher and KD run, and an evaluation newer than the KD model: only the table is left to do.
    s = tmp_path / "gpt2-base"
    for folder in ("sft-teacher/final", "sft-teacher/best", "gpt2-base/kd/final", "gpt2-base/kd/best-rougeL",
                   "gpt2-base/eval-kd"):
        (tmp_path / folder).mkdir(parents=True)
    (s / "eval-kd" / "results.json").write_text("{}")
    os.utime(s / "kd" / "best-rougeL", (1_000, 1_000))
    log = _pipeline("gpt2", "--rows", "kd", "--runs", tmp_path, "--dry-run").stdout
    assert list(_commands(log)) == ["Table 1: ours beside the paper's"]
    assert f"--- skipped (done: {s}/kd/final exists; --force re-runs it): KD baseline" in log
    assert f"skipped (done: {s}/eval-kd/results.json is newer than its models; --force" in log
    # Re-exported after that evaluation: evaluated again. The rows come in Table 1's order, commas allowed.
    os.utime(s / "kd" / "best-rougeL", None)
    os.utime(s / "eval-kd" / "results.json", (1_000, 1_000))
    cmds = _commands(_pipeline("gpt2", "--rows", "seqkd,kd", "--runs", tmp_path, "--dry-run").stdout)
    assert list(cmds)[-2] == "evaluate: KD SeqKD"
    assert f"--model {s}/kd/best-rougeL {s}/seqkd/best-rougeL" in cmds["evaluate: KD SeqKD"]
    assert f"--out {s}/eval-kd-seqkd " in cmds["evaluate: KD SeqKD"]
    assert "KD baseline" not in cmds  # done; its new export is only evaluated
    assert f"teacher.path={tmp_path}/sft-teacher/best " in cmds["SeqKD baseline"]  # best/: there is no best-*
    # Another student size shares the teacher and gets its own folder; another teacher is refused.
    cmds = _commands(_pipeline("gpt2", "--rows", "kd", "--student", "gpt2-medium", "--runs", tmp_path,
                               "--dry-run").stdout)
    assert f"output_dir={tmp_path}/gpt2-medium/kd teacher.path={tmp_path}/sft-teacher/best" in cmds["KD baseline"]
    (tmp_path / "teacher.txt").write_text("gpt2-xl\n")
    out = _pipeline("gpt2", "--teacher", "gpt2-large", "--rows", "kd", "--runs", tmp_path, check=False)
    assert out.returncode == 2 and "holds the rows of teacher gpt2-xl, not gpt2-large" in out.stderr


# ================================================================================================ end to end
@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path):
    log = _pipeline("gpt2", "--tiny", "--runs", tmp_path).stdout
    assert list(_commands(log)) == [
        "SFT teacher", "SFT student (the MiniLLM init and the 'SFT w/o KD' row)",
        "SeqKD data: teacher samples on the training prompts", "KD baseline", "SeqKD baseline", "MiniLLM",
        "evaluate: teacher SFT KD SeqKD MiniLLM", "Table 1: ours beside the paper's"]
    results = json.loads((tmp_path / "gpt2-base" / "eval" / "results.json").read_text())
    assert list(results["results"]) == ["teacher", "SFT", "KD", "SeqKD", "MiniLLM"]
    assert all(set(r["dev"]["seeds"]) == {"10", "20"} for r in results["results"].values())
    assert results["settings"]["preset"] == "paper"
    seqkd = [json.loads(x) for x in (tmp_path / "seqkd-data" / "train.jsonl").read_text().splitlines()]
    assert len(seqkd) == 64
    table = (tmp_path / "gpt2-base" / "eval" / "table.md").read_text()
    assert table.count("\n") == 7 and "| MiniLLM |" in table
    # Table 1: the tiny set's column holds exactly the evaluation's numbers; the paper's columns are there.
    t1 = (tmp_path / "table1.md").read_text()
    assert "| Model | Method | Dolly | SelfInst | Vicuna | S-NI | UnNI | dev |" in t1
    for name, method in table1.ROWS:
        entry = results["results"][name]["dev"]
        ours = f"– / ours {entry['mean']['rougeL']:.2f} ± {entry['std']['rougeL']:.2f}"
        stem = "gpt2-xl" if name == "teacher" else "gpt2-base"
        paper = paper_numbers.paper_rouge_l(stem, method)
        row = _cells(t1, paper_numbers.MODEL_LABELS[stem], method)
        assert row == [f"{'–' if p is None else p} / ours –" for p in paper] + [ours]
    assert _cells(t1, "GPT-2 120M", "MiniLLM")[0] == "24.6 / ours –"
