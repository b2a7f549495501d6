"""minillm-eval over 2 CPU processes (torchrun, gloo): data-parallel shards and ZeRO-3 inference.

Rank r samples its contiguous shard with seed + r (as the reference evaluation seeds ranks), so the oracle is
two single-process runs: the first half of the records at seed s and the second half at seed s + 1.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.distributed


def _env():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    return env


def _outputs(out, model="teacher", data="d"):
    seed = json.loads((Path(out) / model / data / "seed10.json").read_text())
    return [s["output"] for s in seed["samples"]], seed


@pytest.mark.parametrize("zero3", [False, True], ids=["data-parallel", "zero3"])
def test_two_ranks_match_single_process_shards(tmp_path, assets, zero3):
    from minillm.cli.eval import main as eval_main

    lines = (assets / "data" / "dev.jsonl").read_text().splitlines()[:6]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "first.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (tmp_path / "second.jsonl").write_text("\n".join(lines[3:]) + "\n")
    common = ["--model", str(assets / "student"), "--max-new-tokens", "10", "--batch-size", "4", "--no-progress",
              "--teacher", str(assets / "teacher")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "minillm.cli.eval", *common, "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "dist"),
           "--seeds", "10"] + (["--zero3"] if zero3 else [])
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    layout = "ZeRO-3 sharded over 2 rank(s)" if zero3 else "replicated over 2 rank(s)"
    assert layout in proc.stdout
    got, seed = _outputs(tmp_path / "dist", model="student")
    assert seed["num"] == 6
    assert eval_main([*common, "--data", str(tmp_path / "first.jsonl"), "--out", str(tmp_path / "a"),
                      "--seeds", "10"]) == 0
    assert eval_main([*common, "--data", str(tmp_path / "second.jsonl"), "--out", str(tmp_path / "b"),
                      "--seeds", "11"]) == 0
    first, first_seed = _outputs(tmp_path / "a", model="student", data="first")
    second_seed = json.loads((tmp_path / "b" / "student" / "second" / "seed11.json").read_text())
    assert got == first + [s["output"] for s in second_seed["samples"]]
    # The teacher scores a student that is not itself (teacher = model would give k3 = 0 whatever the reduction).
    # Single-process minillm-eval's scores equal independent forwards (test_eval_cli.py); the 2-rank run must reduce
    # the same per-row numbers: k3 is a mean over rows (3 per rank), the teacher log-prob a mean over tokens, so it
    # lies between the shards' own means.
    a, b = first_seed["reverse_kl_k3"], second_seed["reverse_kl_k3"]
    assert min(a, b) > 1e-3 and abs(a - b) > 1e-4
    assert seed["reverse_kl_k3"] == pytest.approx((a + b) / 2, rel=1e-5)
    lo, hi = sorted([first_seed["teacher_logprob"], second_seed["teacher_logprob"]])
    assert lo - 1e-5 < seed["teacher_logprob"] < hi + 1e-5 and hi - lo > 1e-3
    results = json.loads((tmp_path / "dist" / "results.json").read_text())
    assert results["settings"]["world_size"] == 2
