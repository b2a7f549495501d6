"""minillm-generate: SeqKD JSONL that `method: seqkd` trains on, sidecar metadata, exact resume."""

import json
import os

import pytest
import torch

from minillm.cli.generate import main as generate_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def _args(assets, out, *extra):
    return ["--model", str(assets / "teacher"), "--data", str(assets / "data" / "train.jsonl"), "--out", str(out),
            "--num", "20", "--batch-size", "8", "--max-new-tokens", "12", "--no-progress", *extra]


def test_output_and_sidecar(tmp_path, assets):
    out = tmp_path / "seqkd.jsonl"
    assert generate_main(_args(assets, out, "--max-prompt-length", "50")) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    source = [json.loads(x) for x in (assets / "data" / "train.jsonl").read_text().splitlines()][:20]
    from transformers import AutoTokenizer

    from minillm.data import parse_record, render_prompt

    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    prompts = [render_prompt(parse_record(r, "t", i + 1), tok) for i, r in enumerate(source)]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    kept = [i for i, n in enumerate(lengths) if n <= 50]
    assert 0 < len(kept) < 20  # the limit really drops some prompts here
    assert [r["index"] for r in rows] == kept
    assert [r["prompt"] for r in rows] == [prompts[i] for i in kept]
    assert all(set(r) == {"prompt", "output", "index"} and isinstance(r["output"], str) for r in rows)
    meta = json.loads((tmp_path / "seqkd.jsonl.meta.json").read_text())
    assert meta["settings"]["seed"] == 10 and meta["settings"]["top_k"] == 0 and meta["settings"]["temperature"] == 1.0
    assert meta["settings"]["model"] == str(assets / "teacher")
    assert meta["counts"] == {"records_in_source": 300, "records_used": 20, "prompts": len(kept),
                              "dropped": {"prompt_too_long": 20 - len(kept)}, "written": len(kept), "complete": True}


def _greedy(model, ids: list[int], max_new_tokens: int, eos: int) -> tuple[list[int], float]:
    """Plain greedy decoding of one unpadded prompt, no cache: (response ids up to and including EOS, the smallest
    gap between the best and the second-best logit over the steps)."""
    response, margin = [], float("inf")
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + response])).logits[0, -1]
            top = logits.topk(2).values
            margin = min(margin, float(top[0] - top[1]))
            response.append(int(logits.argmax()))
            if response[-1] == eos:
                break
    return response, margin


@pytest.mark.parametrize("engine", ["hf", "fast"])
def test_top_k_1_records_are_an_independent_greedy_decode_of_the_teacher(tmp_path, assets, engine):
    """--top-k 1 leaves one token to sample from, so every record's output must be the teacher's greedy answer to its
    prompt: decoded here with plain transformers, one unpadded prompt at a time (the CLI decodes left-padded batches;
    fp32 padding changes logits by ~1e-6, far below the decision margins asserted here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "greedy.jsonl"
    assert generate_main(_args(assets, out, "--num", "6", "--batch-size", "3", "--top-k", "1",
                               "--engine", engine)) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(6))
    assert json.loads((tmp_path / "greedy.jsonl.meta.json").read_text())["sampling"]["top_k"] == 1
    tok = AutoTokenizer.from_pretrained(assets / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(assets / "teacher").eval()
    decoded = []
    for r in rows:
        ids = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        response, margin = _greedy(teacher, ids, 12, tok.eos_token_id)
        assert margin > 1e-4, (r["index"], margin)  # no near-tie: the greedy answer is well defined
        decoded.append(tok.decode(response, skip_special_tokens=True).strip())
    assert [r["output"] for r in rows] == decoded
    assert len(set(decoded)) > 1 and all(decoded)  # real, prompt-dependent answers


def test_resume_appends_only_missing_records(tmp_path, assets, capsys):
    full = tmp_path / "full.jsonl"
    assert generate_main(_args(assets, full)) == 0
    lines = full.read_text().splitlines(keepends=True)
    assert len(lines) == 20
    # An interrupted run: 9 complete lines and half of the 10th; its sidecar says incomplete.
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:9]) + lines[9][: len(lines[9]) // 2])
    meta = json.loads((tmp_path / "full.jsonl.meta.json").read_text())
    meta["counts"].update(written=9, complete=False)
    (tmp_path / "part.jsonl.meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert generate_main(_args(assets, part)) == 0
    log = capsys.readouterr().out
    # Records 9..19 were missing: batches 1 (8..15) and 2 (16..19) are sampled again, batch 0 is not.
    assert "9 already in" in log and "11 to sample in 2 batches" in log
    assert part.read_text() == full.read_text()  # identical to the uninterrupted run
    assert json.loads((tmp_path / "part.jsonl.meta.json").read_text())["counts"]["complete"] is True
    # Re-running a complete file samples nothing and changes nothing.
    assert generate_main(_args(assets, part)) == 0
    assert "0 to sample" in capsys.readouterr().out
    assert part.read_text() == full.read_text()


def test_other_settings_refuse_to_resume_unless_overwrite(tmp_path, assets, capsys):
    out = tmp_path / "g.jsonl"
    assert generate_main(_args(assets, out, "--num", "4")) == 0
    assert generate_main(_args(assets, out, "--num", "4", "--seed", "11")) == 2
    err = capsys.readouterr().err
    assert "seed: 10 -> 11" in err and "--overwrite" in err
    assert generate_main(_args(assets, out, "--num", "4", "--seed", "11", "--overwrite")) == 0
    assert json.loads((tmp_path / "g.jsonl.meta.json").read_text())["settings"]["seed"] == 11
    (tmp_path / "g.jsonl.meta.json").unlink()
    assert generate_main(_args(assets, out, "--num", "4", "--seed", "11")) == 2
    assert "without its sidecar" in capsys.readouterr().err


def test_generated_file_trains_seqkd_end_to_end(tmp_path, assets):
    out = tmp_path / "teacher.jsonl"
    assert generate_main(_args(assets, out, "--num", "24")) == 0
    run = tmp_path / "run"
    # minillm-train's main in this process: the file is the point here, not the console script (a process of its
    # own costs ~5-10 s of imports; test_train_e2e runs the CLI process)
    from minillm.cli.train import main as train_main

    assert train_main(["--config", "configs/tiny/seqkd.yaml", f"data.train={out}", f"output_dir={run}",
                       "train.max_steps=2", "train.eval_interval=0", "train.save_interval=0"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert [step for step, _ in logged] == [2] and 0 < logged[0][1] < 100  # the last step is always logged
    # the exported student is the trained one: every weight file is there and the weights moved
    from safetensors.torch import load_file

    start = load_file(str(assets / "student" / "model.safetensors"))
    final = load_file(str(run / "final" / "model.safetensors"))
    assert start.keys() == final.keys() and any(not torch.equal(start[k], final[k]) for k in start)
    assert "24 kept" in (run / "train.log").read_text()
    # ... and the trained student is evaluated beside its teacher.
    from minillm.cli.eval import main as eval_main

    assert eval_main(["--model", str(run / "final"), str(assets / "teacher"), "--name", "SeqKD", "teacher",
                      "--data", str(assets / "data" / "dev.jsonl"), "--out", str(tmp_path / "eval"), "--num", "4",
                      "--seeds", "10", "--max-new-tokens", "8", "--no-progress"]) == 0
    table = (tmp_path / "eval" / "table.md").read_text().splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| SeqKD", "| teacher"]


def test_fast_engine_writes_the_same_rows_and_records_itself(tmp_path, assets, capsys):
    """--engine fast: one row per kept prompt in order, reproducible per seed; the sidecar records the engine, so
    resuming with another engine is refused; --no-repeat-ngram-size is refused with advice."""
    out = tmp_path / "fast.jsonl"
    assert generate_main(_args(assets, out, "--engine", "fast")) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(20)) and any(r["output"] for r in rows)
    assert json.loads((tmp_path / "fast.jsonl.meta.json").read_text())["settings"]["engine"] == "fast"
    again = tmp_path / "again.jsonl"
    assert generate_main(_args(assets, again, "--engine", "fast")) == 0
    assert again.read_text() == out.read_text()
    assert generate_main(_args(assets, out, "--engine", "hf")) == 2
    assert "engine" in capsys.readouterr().err
    assert generate_main(_args(assets, tmp_path / "x.jsonl", "--engine", "fast", "--no-repeat-ngram-size", "3")) == 2
    assert "--engine fast does not implement --no-repeat-ngram-size" in capsys.readouterr().err
