"""minillm-data: kept/dropped report, clear errors on bad records, outputs the trainer reads back."""

import json

import pytest

from minillm.cli.data import main as data_main

TEMPLATE_RECORDS = [
    {"instruction": "Add 1 and 2.", "output": "3"},
    {"instruction": "Name the capital of Norway.", "input": "", "output": "Oslo."},
    {"prompt": "### Instruction:\n" + "Repeat the word: ship " * 40 + "\n\n### Response:\n", "output": "ship"},
    {"instruction": "What colour is the leaf?", "output": ["The leaf is green.", "Green."]},
    {"instruction": "Reverse the order of the words.", "input": "dog lamp tree", "output": "tree lamp dog"},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_report_counts_and_outputs_the_trainer_reads(tmp_path, assets, capsys):
    src = _write(tmp_path / "raw.jsonl", TEMPLATE_RECORDS)
    out = tmp_path / "prep"
    assert data_main(["--tokenizer", str(assets / "tokenizer"), "--train", str(src), "--dev-num", "1",
                      "--max-prompt-length", "64", "--max-length", "80", "--out", str(out),
                      "--pretrain", str(assets / "data" / "pretrain.txt"), "--pretrain-seq-length", "32"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    # Record 0 is dev; of the other 4, the 40x repeated prompt is too long.
    assert report["dev"]["read"] == 1 and report["dev"]["kept"] == 1
    assert report["train"]["read"] == 4 and report["train"]["kept"] == 3 and report["train"]["split_off"] == 1
    assert report["train"]["dropped"] == {"prompt_too_long": 1}
    assert "3 kept, 1 dropped [prompt > 64 tokens: 1]" in printed
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert [r["output"] for r in train] == ["Oslo.", ["The leaf is green.", "Green."], "tree lamp dog"]
    from minillm.data import reference_prompt

    assert train[2]["prompt"] == reference_prompt("Reverse the order of the words.", "dog lamp tree")
    # The trainer's own data builder reads the files back with nothing further dropped.
    from transformers import AutoTokenizer

    from minillm.config import DataConfig
    from minillm.data import build_instruction_data, load_or_pack_corpus

    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    cfg = DataConfig(train=str(out / "train.jsonl"), dev=str(out / "dev.jsonl"), max_prompt_length=64, max_length=80,
                     pretrain=str(out / "pretrain"), pretrain_seq_length=32, cache_dir=str(tmp_path / "cache"))
    data = build_instruction_data(cfg, tok)
    assert len(data.train) == 3 and len(data.dev) == 1 and data.stats.train.num_dropped == 0
    corpus = load_or_pack_corpus(cfg, tok)
    assert str(corpus.path) == str(out / "pretrain") and len(corpus) == report["pretrain"]["num_chunks"] > 0
    assert not (tmp_path / "cache").exists()  # the packed folder was used as it is, not re-packed


def test_record_missing_its_field(tmp_path, assets, capsys):
    rows = TEMPLATE_RECORDS[:2] + [{"instruction": "Add 2 and 2."}] + TEMPLATE_RECORDS[3:]
    src = _write(tmp_path / "bad.jsonl", rows)
    args = ["--tokenizer", str(assets / "tokenizer"), "--train", str(src), "--dev-num", "0", "--out", str(tmp_path / "o")]
    assert data_main(args) == 2
    err = capsys.readouterr().err
    assert f"{src}:3: missing field `output`" in err
    assert data_main(args + ["--skip-bad-records"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["train"]["dropped"] == {"bad_record": 1} and report["train"]["kept"] == 4
    assert report["train"]["total"] == 5
    assert "bad.jsonl:3: missing field `output`" in report["bad_records"][0]


def test_nothing_to_do_and_offline_download(tmp_path, capsys):
    with pytest.raises(SystemExit):
        data_main(["--out", str(tmp_path)])
    assert data_main(["--download", "vicuna", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "huggingface-cli download MiniLLM/Vicuna" in capsys.readouterr().err


def test_download_uses_local_copy_in_cache(tmp_path):
    from minillm.data.prepare import download_sets

    cached = tmp_path / "c" / "sets" / "vicuna" / "valid.jsonl"
    cached.parent.mkdir(parents=True)
    cached.write_text(json.dumps({"prompt": "p", "output": "o"}) + "\n")
    assert download_sets(["vicuna"], str(tmp_path / "c"), log=lambda _: None) == {"vicuna": [str(cached)]}
    from minillm.data import load_records

    assert load_records("vicuna", split="test", cache_dir=str(tmp_path / "c"))[0].prompt == "p"
