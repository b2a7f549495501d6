"""Issue 20 (items 1, 2, 5, 6, 7): the paper-era and current-official evaluation presets, BOS on evaluation
prompts, fp16 as the GPU evaluation default, SeqKD's gold dev set, the reference's pre-training document shape
and the Megatron MMIDIDX corpus reader/importer (files written here from the format's description)."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from minillm.data import DataError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


# ============================================================================ items 1, 2, 6: settings
def _resolve(flags=None, config=None):
    from minillm.evaluation.settings import resolve_settings

    base = {"model": ["m"], "data": ["d"], "out": "o", "device": "cpu"}
    return resolve_settings({**base, **(flags or {})}, config)


def test_presets_name_the_paper_and_the_current_official_decoding(tmp_path):
    from minillm.evaluation.settings import SettingsError

    plain = _resolve()
    assert (plain.no_repeat_ngram_size, plain.prompt_bos, plain.preset) == (0, False, None)
    paper = _resolve({"preset": "paper"})
    assert (paper.no_repeat_ngram_size, paper.prompt_bos) == (0, True)
    head = _resolve({"preset": "official-head"})
    assert (head.no_repeat_ngram_size, head.prompt_bos) == (6, False)
    # A flag beats the preset; the preset named on the command line beats the file's preset.
    assert _resolve({"preset": "paper", "prompt_bos": False}).prompt_bos is False
    cfg = tmp_path / "e.yaml"
    cfg.write_text("preset: paper\n")
    assert (_resolve({}, str(cfg)).prompt_bos, _resolve({"preset": "official-head"}, str(cfg)).prompt_bos) == (True, False)
    # The file's own keys beat its preset.
    cfg.write_text("preset: official-head\nno_repeat_ngram_size: 3\n")
    assert _resolve({}, str(cfg)).no_repeat_ngram_size == 3
    with pytest.raises(SettingsError, match="--preset must be one of paper, official-head"):
        _resolve({"preset": "2023"})


def test_cli_flags_reach_the_settings():
    from minillm.cli.eval import make_parser

    args = vars(make_parser().parse_args(["--preset", "official-head", "--no-prompt-bos", "--dtype", "auto"]))
    assert args == {"preset": "official-head", "prompt_bos": False, "dtype": "auto"}
    assert vars(make_parser().parse_args(["--prompt-bos"])) == {"prompt_bos": True}


@pytest.mark.parametrize("stem,bos", [("gpt2-base", True), ("opt-1.3b", True), ("llama-7b", True)])
def test_shipped_eval_presets(stem, bos, monkeypatch):
    import torch

    from minillm.evaluation.settings import DEFAULT_SEEDS, EVAL_SETS, resolve_settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node
    path = str(CONFIGS / "eval" / f"{stem}.yaml")
    s = resolve_settings({}, path)
    assert (s.preset, s.no_repeat_ngram_size, s.prompt_bos, s.dtype) == ("paper", 0, bos, "fp16")
    assert s.data == list(EVAL_SETS) and s.seeds == DEFAULT_SEEDS and s.name == ["teacher", "SFT", "KD", "SeqKD",
                                                                                   "MiniLLM"]
    assert all(stem in m for m in s.model[1:]) and s.out == f"runs/eval/{stem}"
    head = resolve_settings({"preset": "official-head"}, path)
    assert (head.no_repeat_ngram_size, head.prompt_bos, head.engine) == (6, False, "auto")
    header = Path(path).read_text().split("\nmodel:")[0]
    assert "--preset official-head" in header and "prompt_bos" in header and "fp16" in header


def test_dtype_auto_is_fp16_on_cuda_and_fp32_on_cpu(monkeypatch):
    import torch

    from minillm.evaluation.settings import EvalSettings

    assert EvalSettings.dtype == "auto"
    assert _resolve({"device": "cpu"}).dtype == "fp32"
    assert _resolve({"device": "cuda"}).dtype == "fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _resolve({"device": "auto"}).dtype == "fp16"
    assert _resolve({"device": "auto", "dtype": "bf16"}).dtype == "bf16"  # an explicit choice stays
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _resolve({"device": "auto"}).dtype == "fp32"


def test_pipeline_and_readme_evaluate_in_the_protocols_precision():
    script = (REPO / "scripts" / "pipeline.sh").read_text()
    assert "--dtype auto" in script and "--dtype fp32" not in script
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### minillm-eval"):readme.index("### minillm-generate")]
    assert "fp16" in section and "--preset official-head" in section and "--prompt-bos" in section


# ============================================================================ item 2: BOS on prompts
def _bos_tokenizer_dir(src: Path, dst: Path) -> Path:
    """A copy of the committed tokenizer whose default encoding puts <|endoftext|> (its BOS) first, as the
    OPT/LLaMA hub tokenizers do."""
    if src != dst:
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file():
                shutil.copy(f, dst / f.name)
    tj = json.loads((dst / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    tj["post_processor"] = {"type": "Sequence", "processors": [tj["post_processor"], {
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}]}
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


def test_prompt_bos_encodes_with_the_tokenizers_default_special_tokens(tmp_path, assets):
    from transformers import AutoTokenizer

    from minillm.evaluation.runner import load_eval_set
    from minillm.evaluation.settings import EvalSettings

    plain_tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    bos_tok = AutoTokenizer.from_pretrained(_bos_tokenizer_dir(assets / "tokenizer", tmp_path / "bos"))
    data = str(assets / "data" / "dev.jsonl")
    from minillm.data import parse_record, render_prompt

    records = [json.loads(x) for x in (assets / "data" / "dev.jsonl").read_text().splitlines()][:6]
    texts = [render_prompt(parse_record(r, "d", i + 1), plain_tok) for i, r in enumerate(records)]
    plain = [plain_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert bos_tok(texts[0])["input_ids"] == [0] + plain[0]  # the fixture really adds BOS by default
    limit = 12
    assert all(len(p) > limit for p in plain)

    def prompts(tok, bos):
        return load_eval_set(data, "dev", tok, EvalSettings(num=6, max_prompt_length=limit, prompt_bos=bos))

    # BOS tokenizer: BOS first, and it counts towards the cut (the reference cut encode(prompt)[:256]).
    with_bos = prompts(bos_tok, True)
    assert with_bos.prompts.prompt_ids == [[bos_tok.bos_token_id] + p[:limit - 1] for p in plain]
    assert with_bos.stats.truncated == 6
    assert prompts(bos_tok, False).prompts.prompt_ids == [p[:limit] for p in plain]
    # GPT-2-like tokenizer (adds nothing by default): --prompt-bos changes nothing.
    assert prompts(plain_tok, True).prompts.prompt_ids == prompts(plain_tok, False).prompts.prompt_ids \
        == [p[:limit] for p in plain]


def test_eval_cli_prompt_bos_end_to_end(tmp_path, assets):
    from minillm.cli.eval import main as eval_main

    model = tmp_path / "student"
    shutil.copytree(assets / "student", model)
    _bos_tokenizer_dir(model, model)
    argv = ["--model", str(model), "--data", str(assets / "data" / "dev.jsonl"), "--num", "3", "--seeds", "10",
            "--max-new-tokens", "4", "--batch-size", "3", "--no-progress", "--device", "cpu"]
    assert eval_main([*argv, "--out", str(tmp_path / "bos"), "--preset", "paper"]) == 0
    assert eval_main([*argv, "--out", str(tmp_path / "head"), "--preset", "official-head"]) == 0
    bos = json.loads((tmp_path / "bos" / "student" / "dev" / "seed10.json").read_text())["samples"]
    head = json.loads((tmp_path / "head" / "student" / "dev" / "seed10.json").read_text())["samples"]
    assert all(b["prompt"] == "<|endoftext|>" + h["prompt"] for b, h in zip(bos, head))
    settings = json.loads((tmp_path / "head" / "results.json").read_text())["settings"]
    assert (settings["preset"], settings["prompt_bos"], settings["no_repeat_ngram_size"], settings["dtype"]) == (
        "official-head", False, 6, "fp32")


# ============================================================================ item 5: SeqKD dev set
def _gen_args(assets, out, *extra):
    return ["--model", str(assets / "teacher"), "--data", str(assets / "data" / "train.jsonl"), "--out", str(out),
            "--batch-size", "8", "--max-new-tokens", "6", "--no-progress", *extra]


def test_generate_samples_train_records_only_and_writes_the_gold_dev_set(tmp_path, assets):
    from transformers import AutoTokenizer

    from minillm.cli.generate import main as generate_main
    from minillm.data import parse_record, render_prompt

    out = tmp_path / "seqkd" / "train.jsonl"
    assert generate_main(_gen_args(assets, out, "--dev-num", "5", "--num", "7")) == 0
    source = [json.loads(x) for x in (assets / "data" / "train.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    rendered = [render_prompt(parse_record(r, "t", i + 1), tok) for i, r in enumerate(source)]
    dev = [json.loads(x) for x in (tmp_path / "seqkd" / "dev.jsonl").read_text().splitlines()]
    assert dev == [{"prompt": rendered[i], "output": source[i]["output"], "index": i} for i in range(5)]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    # Only records 5..11 are sampled; indices stay positions in the source.
    assert [r["index"] for r in rows] == list(range(5, 12))
    assert [r["prompt"] for r in rows] == rendered[5:12]
    meta = json.loads((tmp_path / "seqkd" / "train.jsonl.meta.json").read_text())
    assert meta["settings"]["dev_num"] == 5 and meta["dev"]["records"] == 5
    assert meta["counts"]["records_used"] == 7 and meta["counts"]["complete"] is True
    # Resuming samples nothing; another --dev-num is another file.
    before = out.read_text()
    assert generate_main(_gen_args(assets, out, "--dev-num", "5", "--num", "7")) == 0
    assert out.read_text() == before
    # user errors: one line, exit 2 (minillm.cli.report_user_error)
    assert generate_main(_gen_args(assets, out, "--dev-num", "4", "--num", "7")) == 2
    assert generate_main(_gen_args(assets, tmp_path / "dev.jsonl", "--dev-num", "2")) == 2  # would overwrite


def test_dev_num_defaults_to_the_reference_split_for_dolly_only():
    from minillm.evaluation.teacher_samples import GenerateSettings, resolve_dev_num

    assert resolve_dev_num(GenerateSettings(model="m", data="dolly")) == 1000
    assert resolve_dev_num(GenerateSettings(model="m", data="my.jsonl")) == 0
    assert resolve_dev_num(GenerateSettings(model="m", data="dolly", dev_num=0)) == 0


def test_old_sidecars_without_dev_num_still_resume(tmp_path, assets):
    from minillm.cli.generate import main as generate_main

    out = tmp_path / "g.jsonl"
    assert generate_main(_gen_args(assets, out, "--num", "3")) == 0
    meta_path = tmp_path / "g.jsonl.meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["settings"]["dev_num"]
    meta_path.write_text(json.dumps(meta))
    assert generate_main(_gen_args(assets, out, "--num", "3")) == 0


@pytest.mark.parametrize("name", ["gpt2-base", "gpt2-medium", "gpt2-large", "opt-1.3b", "opt-2.7b", "opt-6.7b",
                                  "llama-7b"])
def test_seqkd_recipes_use_the_gold_dev_set(name):
    from minillm.config import load_config

    path = CONFIGS / "seqkd" / f"{name}.yaml"
    cfg = load_config(str(path))
    folder = Path(cfg.data.train).parent
    assert cfg.data.dev == str(folder / "dev.jsonl") and cfg.data.dev_num == 0
    assert re.search(rf"minillm-generate .*--output {cfg.data.train} --dev-num 1000", path.read_text())


def test_pipeline_trains_seqkd_on_the_gold_dev_set():
    script = (REPO / "scripts" / "pipeline.sh").read_text()
    assert 'data.dev="$SEQKD_DEV" data.dev_num=0' in script
    assert '--dev-num "$GEN_DEV_NUM" --dev-out "$SEQKD_DEV"' in script


# ============================================================================ item 7: corpus documents
def test_documents_end_with_newline_and_eos_and_newline_runs_collapse(tmp_path):
    """Oracle: the reference's two steps, replayed literally on the same raw documents."""
    from transformers import ByT5Tokenizer

    from minillm.data import pack_corpus
    from minillm.data.pretrain import reference_document

    tok = ByT5Tokenizer(extra_ids=0)
    raw = ["first\n\n\nsecond para\nthird", "ends with newline\n", "\n\nstarts blank", "one line"]
    assert reference_document(raw[0]) == "first\nsecond para\nthird\n"
    assert reference_document(raw[1]) == "ends with newline\n\n"
    # get_openwebtext.py: one line per document, newline runs -> one marker.
    dump = tmp_path / "data.txt"
    with open(dump, "w") as f:
        for text in raw:
            f.write(re.sub(r"\n+", "<@x(x!>", text) + "\n")
    # process_data_pretrain.py: each line (with its "\n"), markers back to "\n", encode, + EOS.
    stream: list[int] = []
    with open(dump) as f:
        for line in f:
            stream += tok.encode(line.replace("<@x(x!>", "\n"), add_special_tokens=False) + [tok.eos_token_id]
    n = len(stream) // 8
    want = np.asarray(stream[: n * 8]).reshape(n, 8).tolist()
    jsonl = tmp_path / "raw.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in raw))
    assert pack_corpus(str(jsonl), tok, tmp_path / "from-raw", seq_length=8).tokens.tolist() == want
    assert pack_corpus(str(dump), tok, tmp_path / "from-dump", seq_length=8).tokens.tolist() == want


# ============================================================================ item 7: Megatron MMIDIDX
DTYPE_CODE = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}


def write_mmidx(prefix: Path, items: list[list[int]], dtype=np.uint16) -> None:
    """An indexed dataset written from the format's description (header, sizes int32, pointers int64 in bytes,
    document index int64), independently of minillm.data.megatron."""
    dtype = np.dtype(dtype)
    sizes = [len(x) for x in items]
    pointers, at = [], 0
    for size in sizes:
        pointers.append(at)
        at += size * dtype.itemsize
    doc_idx = list(range(len(items) + 1))
    Path(f"{prefix}.bin").write_bytes(b"".join(np.asarray(x, dtype=dtype).tobytes() for x in items))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DTYPE_CODE[dtype]))
        f.write(struct.pack("<Q", len(items)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))


@pytest.fixture
def gpt2ish_tok(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets / "tokenizer")  # 512 ids


def _chunks(rng, n, length, vocab=512):
    return rng.integers(0, vocab, size=(n, length)).tolist()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_shards_read_in_place_through_data_pretrain(tmp_path, gpt2ish_tok, dtype):
    from minillm.config import DataConfig
    from minillm.data import load_or_pack_corpus
    from minillm.data.megatron import MegatronCorpus
    from minillm.data.teacher_cache import corpus_fingerprint

    rng = np.random.default_rng(0)
    shard0, shard1 = _chunks(rng, 5, 8), _chunks(rng, 3, 8)
    write_mmidx(tmp_path / "train_0", shard0, dtype)
    write_mmidx(tmp_path / "train_1", shard1, dtype)
    everything = shard0 + shard1
    for name in ("train", "train_0", "train_0.bin", "train_0.idx", ""):
        corpus = load_or_pack_corpus(DataConfig(pretrain=str(tmp_path / name) if name else str(tmp_path),
                                                pretrain_seq_length=8), gpt2ish_tok)
        assert isinstance(corpus, MegatronCorpus)
        want = everything if name in ("train", "") else shard0
        assert len(corpus) == len(want) and corpus.tokens.tolist() == want
    corpus = MegatronCorpus(tmp_path / "train")
    item = corpus[6]  # in the second shard
    assert item["input_ids"].tolist() == everything[6][:-1] and item["labels"].tolist() == everything[6][1:]
    assert item["input_ids"].dtype.is_floating_point is False and item["index"] == 6
    assert corpus.tokens[3:7].tolist() == everything[3:7]  # slices across the shard boundary
    import pickle

    again = pickle.loads(pickle.dumps(corpus))  # DataLoader workers get a copy that reopens the maps
    assert again._tokens is None and again[6]["labels"].tolist() == everything[6][1:]
    # The teacher cache's fingerprint reads it like a packed corpus of the same chunks.
    from minillm.data.pretrain import import_megatron

    imported = import_megatron(tmp_path / "train", gpt2ish_tok, tmp_path / "packed", seq_length=8)
    assert imported.tokens.tolist() == everything
    assert corpus_fingerprint(imported) == corpus_fingerprint(corpus)
    with pytest.raises(DataError, match="8-token chunks, but data.pretrain_seq_length=16"):
        load_or_pack_corpus(DataConfig(pretrain=str(tmp_path / "train"), pretrain_seq_length=16), gpt2ish_tok)


def test_megatron_checks_vocabulary_lengths_and_format(tmp_path, gpt2ish_tok):
    from minillm.config import DataConfig
    from minillm.data import load_or_pack_corpus
    from minillm.data.megatron import MegatronCorpus, read_index

    write_mmidx(tmp_path / "big", [[1, 2, 3, 600]] * 2)  # id 600 is outside the 512-id vocabulary
    with pytest.raises(DataError, match="token id 600.*512"):
        load_or_pack_corpus(DataConfig(pretrain=str(tmp_path / "big"), pretrain_seq_length=4), gpt2ish_tok)
    write_mmidx(tmp_path / "ragged", [[1, 2, 3], [4, 5, 6, 7, 8]])
    with pytest.raises(DataError, match="not fixed-length chunks.*minillm-data"):
        MegatronCorpus(tmp_path / "ragged")
    raw = (tmp_path / "big.idx").read_bytes()
    (tmp_path / "bad.idx").write_bytes(b"TNTIDX\x00\x00\x00" + raw[9:])
    shutil.copy(tmp_path / "big.bin", tmp_path / "bad.bin")
    with pytest.raises(DataError, match="not a Megatron MMIDIDX index"):
        read_index(tmp_path / "bad")
    (tmp_path / "cut.idx").write_bytes(raw[:-8])
    shutil.copy(tmp_path / "big.bin", tmp_path / "cut.bin")
    with pytest.raises(DataError, match="truncated"):
        read_index(tmp_path / "cut")
    (tmp_path / "short.idx").write_bytes(raw)
    (tmp_path / "short.bin").write_bytes((tmp_path / "big.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match="too short"):
        read_index(tmp_path / "short")


def test_minillm_data_imports_a_megatron_corpus(tmp_path, assets, gpt2ish_tok):
    """Ragged items are concatenated in order and re-chunked; the folder is a packed corpus with the
    tokenizer's fingerprint, so data.pretrain=OUT/pretrain passes the trainer's vocabulary check."""
    from minillm.cli.data import main as data_main
    from minillm.config import DataConfig
    from minillm.data import PackedCorpus, load_or_pack_corpus

    items = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16]]
    write_mmidx(tmp_path / "owt_0", items)
    out = tmp_path / "prepared"
    assert data_main(["--tokenizer", str(assets / "tokenizer"), "--pretrain", str(tmp_path / "owt"),
                      "--pretrain-seq-length", "4", "--out", str(out)]) == 0
    corpus = PackedCorpus(out / "pretrain")
    assert corpus.tokens.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    assert corpus.meta["imported_from"] == "megatron-mmidx" and corpus.meta["dropped_tail_tokens"] == 0
    assert load_or_pack_corpus(DataConfig(pretrain=str(out / "pretrain"), pretrain_seq_length=4),
                               gpt2ish_tok).tokens.tolist() == corpus.tokens.tolist()
    report = json.loads((out / "report.json").read_text())
    assert report["pretrain"]["num_chunks"] == 4
    assert data_main(["--tokenizer", str(assets / "tokenizer"), "--pretrain", str(tmp_path / "owt"),
                      "--pretrain-seq-length", "3", "--max-chunks", "2", "--out", str(tmp_path / "few")]) == 0
    assert PackedCorpus(tmp_path / "few" / "pretrain").tokens.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert data_main(["--tokenizer", str(assets / "tokenizer"), "--pretrain", str(tmp_path / "owt"), "x.txt",
                      "--out", str(tmp_path / "mixed")]) == 2
