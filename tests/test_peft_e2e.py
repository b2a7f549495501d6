"""``student.peft.method=lora`` end to end (the resume through the real CLI): kd and minillm write a merged
``final/`` plus ``final/adapter/``, minillm-eval and minillm-generate take either, a stopped and resumed LoRA run
equals the uninterrupted one bit for bit, and ZeRO-3 on 2 ranks equals the local run.

Timings on 2 shared CPU cores: each kd run ~10 s, the minillm run ~20 s, the 2-rank ZeRO-3 test ~45 s. Runs whose
process is not the point are in-process (a console-script process costs ~5-10 s of imports).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from test_deepspeed import COMMON as DS_COMMON  # noqa: E402
from test_deepspeed import launch, losses  # noqa: E402
from test_train_e2e import metrics, run_cli, run_in_process, weights  # noqa: E402

# one intra-op thread in-process, as run_cli gives its processes: in-process and CLI runs then agree bitwise
pytestmark = pytest.mark.usefixtures("one_thread")

LORA = ["student.peft.method=lora", "student.peft.r=4"]
KD = ["--config", "configs/tiny/kd.yaml", *LORA, "train.max_steps=4", "train.save_interval=2",
      "train.eval_interval=2", "eval.num_prompts=8", "logging.log_interval=1"]
EVAL = ["--max-new-tokens", "12", "--batch-size", "4", "--no-progress", "--num", "6", "--seeds", "10"]


def adapter_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def assert_equal_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def check_lora_outputs(run: Path, step: int) -> None:
    """final/: a merged HF folder (base parameter names only) that AutoModelForCausalLM loads; final/adapter/: the
    peft adapter; step checkpoints: the adapter and its (small) optimizer state, no full weights."""
    from transformers import AutoModelForCausalLM

    final = run / "final"
    names = set(weights(final))
    assert names == set(weights("tests/assets/student")), "merged final/ must carry the base model's names"
    AutoModelForCausalLM.from_pretrained(final)
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and Path(config["base_model_name_or_path"]) == Path("tests/assets/student").resolve()
    assert all(".lora_" in k for k in adapter_weights(final / "adapter"))
    ckpt = run / "checkpoints" / f"step-{step}"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()


def eval_rouge(model: Path, out: Path) -> list:
    from minillm.cli.eval import main as eval_main

    assert eval_main(["--model", str(model), "--data", "tests/assets/data/dev.jsonl", "--out", str(out),
                      *EVAL]) == 0
    (result,) = [json.loads(p.read_text()) for p in out.glob("*/dev/seed10.json")]
    return result["samples"]


def test_kd_lora_writes_merged_final_and_adapter_that_eval_loads_and_resumes_bit_for_bit(tmp_path):
    full, parted = tmp_path / "full", tmp_path / "parted"
    run_in_process(*KD, f"output_dir={full}")
    check_lora_outputs(full, 4)
    optimizer = torch.load(full / "checkpoints" / "step-4" / "optimizer.pt", weights_only=True)["optimizer"]
    adapter_numel = sum(v.numel() for v in adapter_weights(full / "final" / "adapter").values())
    assert sum(s["exp_avg"].numel() for s in optimizer["state"].values()) == adapter_numel  # Adam state: adapter only

    run_in_process(*KD, f"output_dir={parted}", "train.stop_at_step=2")
    assert not (parted / "final").exists()
    run_cli(*KD, f"output_dir={parted}", "--resume")  # a new process: the adapter state comes from the checkpoint
    assert_equal_tensors(weights(full / "final"), weights(parted / "final"), "merged final/")
    assert_equal_tensors(adapter_weights(full / "final" / "adapter"), adapter_weights(parted / "final" / "adapter"),
                         "final/adapter/")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/") and "per_s" not in k}  # noqa: E731
                          for r in rows]
    assert strip(metrics(full)) == strip(metrics(parted))

    # minillm-eval: the merged folder and the adapter folder (merged at load) answer identically
    merged, adapter = eval_rouge(full / "final", tmp_path / "e1"), eval_rouge(full / "final" / "adapter", tmp_path / "e2")
    assert [s["output"] for s in merged] == [s["output"] for s in adapter]
    # minillm-generate too
    from minillm.cli.generate import main as generate_main

    rows = []
    for i, model in enumerate((full / "final", full / "final" / "adapter")):
        out = tmp_path / f"gen{i}.jsonl"
        assert generate_main(["--model", str(model), "--data", "tests/assets/data/dev.jsonl", "--out", str(out),
                              "--num", "4", "--max-new-tokens", "8", "--no-progress"]) == 0
        rows.append([json.loads(x)["output"] for x in out.read_text().splitlines()])
    assert rows[0] == rows[1] and len(rows[0]) == 4


def test_minillm_lora_writes_merged_final_and_adapter(tmp_path):
    out = tmp_path / "ml"
    run_in_process("--config", "configs/tiny/minillm.yaml", *LORA, f"output_dir={out}", "train.max_steps=2",
                   "train.save_interval=2", "train.eval_interval=2", "eval.num_prompts=4", "rollout.num_rollouts=16",
                   "train.global_batch_size=8")
    check_lora_outputs(out, 2)
    base, merged = weights("tests/assets/student"), weights(out / "final")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    # the adapter (default targets q_proj, v_proj) moved exactly the adapted weights; nothing else
    assert changed == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
    outputs = [eval_rouge(out / name, tmp_path / name.replace("/", "-")) for name in ("final", "final/adapter")]
    assert [s["output"] for s in outputs[0]] == [s["output"] for s in outputs[1]]


@pytest.mark.distributed
def test_kd_lora_zero3_on_two_ranks_equals_the_local_run(tmp_path):
    """One 2-rank launch (~45 s with the local run): losses, adapter and merged final/ equal the local run's. (A
    ZeRO-3 LoRA run stopped at a checkpoint and resumed was checked by hand to end bit for bit where the
    uninterrupted one does; a second 2-rank launch for it would double this test's time.)"""
    args = [*DS_COMMON["kd"], *LORA, "train.max_steps=3", "train.eval_interval=0", "train.save_interval=3"]
    local, zero3 = tmp_path / "local", tmp_path / "zero3"
    run_in_process(*args, f"output_dir={local}")  # the reference needs no process of its own
    launch([*args, f"output_dir={zero3}", "strategy.backend=deepspeed", "strategy.zero_stage=3"], nproc=2,
           timeout=240)
    ref, got = losses(local), losses(zero3)
    assert [s for s, _ in ref] == [s for s, _ in got] == [1, 2, 3]
    for (_, a), (_, b) in zip(ref, got):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
    a, b = adapter_weights(local / "final" / "adapter"), adapter_weights(zero3 / "final" / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)
    merged_local, merged_zero3 = weights(local / "final"), weights(zero3 / "final")
    for key in merged_local:
        torch.testing.assert_close(merged_zero3[key], merged_local[key], atol=1e-5, rtol=1e-4, msg=key)
    ckpt = zero3 / "checkpoints" / "step-3"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "deepspeed").is_dir()
