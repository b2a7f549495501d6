"""scripts/pipeline.sh --tiny: SFT teacher -> SFT student -> SeqKD data -> KD / SeqKD -> MiniLLM -> one eval table.

The whole chain takes 1-2 minutes on 2 CPU cores, so it is marked slow; the generate -> seqkd -> eval part is
also covered quickly by tests/test_generate_cli.py::test_generated_file_trains_seqkd_end_to_end.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(runs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(["bash", "scripts/pipeline.sh", "gpt2", "--tiny", "--runs", str(runs)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_pipeline_help_and_bad_family():
    out = subprocess.run(["bash", "scripts/pipeline.sh", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "--tiny" in out.stdout
    out = subprocess.run(["bash", "scripts/pipeline.sh", "nosuch"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "--teacher and --student" in out.stderr


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path):
    log = _run(tmp_path)
    steps = [line for line in log.splitlines() if line.startswith("==> [")]
    assert [s.split("] ", 1)[1] for s in steps] == [
        "SFT teacher", "SFT student (the MiniLLM init and the 'SFT w/o KD' row)",
        "SeqKD data: teacher samples on the training prompts", "KD baseline", "SeqKD baseline", "MiniLLM",
        "evaluate everything side by side"]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert list(results["results"]) == ["teacher", "SFT", "KD", "SeqKD", "MiniLLM"]
    assert all(set(r["dev"]["seeds"]) == {"10", "20"} for r in results["results"].values())
    seqkd = [json.loads(x) for x in (tmp_path / "seqkd-data" / "train.jsonl").read_text().splitlines()]
    assert len(seqkd) == 64
    table = (tmp_path / "eval" / "table.md").read_text()
    assert table.count("\n") == 7 and "| MiniLLM |" in table
