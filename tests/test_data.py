"""minillm.data: records, templates, tokenisation and masking, collators, dev split, corpus packing, sampler.

The tokenizer is ByT5's (built in-process, no files): every byte b is token b + 3, pad = 0, EOS = 1. That
makes every expected id list below computable by hand: "a" = 97 + 3 = 100, "b" = 101, "c" = 102, ...
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from minillm.config import DataConfig
from minillm.data import (DataError, InfiniteBatches, PackedCorpus, PromptCollator, ResumableSampler,
                          SFTCollator, build_instruction_data, build_prompt_dataset, load_or_pack_corpus,
                          load_records, pack_corpus, reference_prompt, render_prompt, token_dtype)
from minillm.data.instruction import DataStats, PROMPT_TOO_LONG, SFTDataset, tokenize_records
from minillm.data.records import Record

EOS, PAD = 1, 0


def ids(text: str) -> list[int]:
    """ByT5 ids of ``text``: its UTF-8 bytes shifted by 3."""
    return [b + 3 for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def tok():
    from transformers import ByT5Tokenizer

    t = ByT5Tokenizer()
    assert (t.eos_token_id, t.pad_token_id) == (EOS, PAD)
    assert t.encode("ab", add_special_tokens=False) == [100, 101]
    return t


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ records
def test_each_record_shape_parses(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "P1", "output": "O1"},
        {"prompt": "P2", "output": ["R1", "R2"]},
        {"instruction": "I3", "input": "X3", "output": "O3"},
        {"instruction": "I4", "input": "", "output": "O4"},
        {"instruction": "I5", "output": "O5"},
        {"instruction": "I6", "context": "C6", "response": "R6", "category": "qa"},
        {"instruction": "I7", "prompt": "P7", "input": "", "output": "O7"},  # a MiniLLM-set record
    ])
    recs = load_records(str(path))
    got = [(r.instruction, r.input, r.prompt, r.references, r.line) for r in recs]
    assert got == [
        (None, "", "P1", ["O1"], 1),
        (None, "", "P2", ["R1", "R2"], 2),
        ("I3", "X3", None, ["O3"], 3),
        ("I4", "", None, ["O4"], 4),
        ("I5", "", None, ["O5"], 5),
        ("I6", "C6", None, ["R6"], 6),
        ("I7", "", "P7", ["O7"], 7),
    ]
    assert recs[1].response == "R1" and recs[0].source == str(path)


def test_json_array_file_reports_lines(tmp_path):
    path = tmp_path / "set.json"
    path.write_text('[\n  {"prompt": "a", "output": "b"},\n  {"instruction": "c",\n   "output": "d"}\n]\n')
    recs = load_records(str(path))
    assert [(r.line, r.prompt, r.instruction) for r in recs] == [(2, "a", None), (3, None, "c")]
    path.write_text('[\n  {"prompt": "a", "output": "b"},\n\n  {"prompt": "c"}\n]')
    with pytest.raises(DataError, match=rf"{path}:4: missing field `output`"):
        load_records(str(path))
    path.write_text('[\n  {"prompt": "a", "output": "b"}\n  {"prompt": "c", "output": "d"}\n]')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        load_records(str(path))


def test_missing_fields_name_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "output": "b"}, {"prompt": "a", "output": "b"},
                                              {"prompt": "no answer"}])
    with pytest.raises(DataError, match=rf"{path}:3: missing field `output`"):
        load_records(str(path))
    write_jsonl(path, [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=rf"{path}:1: missing field `prompt` or `instruction`.*question"):
        load_records(str(path))
    write_jsonl(path, [{"instruction": "i", "output": 3}])
    with pytest.raises(DataError, match=rf"{path}:1: field `output` must be a string or a non-empty list"):
        load_records(str(path))
    write_jsonl(path, [{"instruction": "i", "output": []}])
    with pytest.raises(DataError, match="non-empty list"):
        load_records(str(path))
    # A custom response field (DataConfig.response_field), and prompt-only reading for generation.
    write_jsonl(path, [{"prompt": "p", "gen": "g"}])
    assert load_records(str(path), response_field="gen")[0].references == ["g"]
    write_jsonl(path, [{"prompt": "p"}])
    assert load_records(str(path), require_response=False)[0].references == []


def test_bad_json_and_empty_set_fail_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "output": "b"}\n\n{"prompt": "a", "output": \n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        load_records(str(path))
    path.write_text("\n\n")
    with pytest.raises(DataError, match=rf"{path}: the file holds no records"):
        load_records(str(path))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="no records"):
        load_records(str(tmp_path / "empty.json"))
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="unknown data source"):
        load_records("not-a-set")


def test_folder_and_named_set_from_cache(tmp_path):
    folder = tmp_path / "dolly"
    folder.mkdir()
    write_jsonl(folder / "raw.jsonl", [{"instruction": "train", "context": "", "response": "r"}])
    write_jsonl(folder / "valid.jsonl", [{"prompt": "test", "output": "o"}])
    assert load_records(str(folder), split="train")[0].instruction == "train"
    assert load_records(str(folder), split="test")[0].prompt == "test"
    # Named sets are looked up in cache_dir/sets/<name>/ before the hub (sinst: length bucket 11_).
    sets = tmp_path / "cache" / "sets"
    (sets / "sinst" / "11_").mkdir(parents=True)
    write_jsonl(sets / "sinst" / "11_" / "valid.jsonl", [{"prompt": "s", "output": ["x", "y"]}])
    recs = load_records("sinst", cache_dir=str(tmp_path / "cache"))
    assert recs[0].references == ["x", "y"]


def test_unreachable_hub_says_so_and_how_to_pass_a_file(tmp_path):
    # An empty cache_dir and HF_HUB_OFFLINE=1 (conftest): the hub cannot be reached.
    with pytest.raises(DataError, match=r"MiniLLM/Vicuna.*unreachable.*local file or folder") as e:
        load_records("vicuna", cache_dir=str(tmp_path))
    assert "valid.jsonl" in str(e.value)
    with pytest.raises(DataError, match=r"someone/some-set.*unreachable.*local file"):
        load_records("someone/some-set", cache_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------ templates
def test_reference_template_exact_text():
    assert reference_prompt("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")
    assert reference_prompt("Summarise.", "Cats sleep a lot.") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSummarise.\n\n"
        "### Input:\nCats sleep a lot.\n\n### Response:\n")


def test_template_modes(tok):
    inst = Record(instruction="Do X", input="ctx", references=["r"])
    pre = Record(prompt="PRE", instruction="Do Y", references=["r"])
    bare = Record(prompt="ONLY", references=["r"])
    assert render_prompt(inst, tok, "auto") == reference_prompt("Do X", "ctx")
    assert render_prompt(pre, tok, "auto") == "PRE"
    assert render_prompt(pre, tok, "reference") == reference_prompt("Do Y")
    assert render_prompt(bare, tok, "reference") == reference_prompt("ONLY")
    assert render_prompt(inst, tok, "raw") == "Do X\n\nctx"
    assert render_prompt(pre, tok, "raw") == "PRE"
    with pytest.raises(DataError, match="no chat template"):
        render_prompt(inst, tok, "chat")
    from transformers import ByT5Tokenizer

    chat_tok = ByT5Tokenizer()
    chat_tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                              "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert render_prompt(inst, chat_tok, "chat") == "<user>Do X\n\nctx</s><assistant>"
    assert render_prompt(bare, chat_tok, "chat") == "<user>ONLY</s><assistant>"
    with pytest.raises(DataError, match="unknown data.template"):
        render_prompt(inst, tok, "fancy")


# ------------------------------------------------------------------------------------------ tokenisation
def test_sft_labels_mask_the_prompt(tok):
    recs = [Record(prompt="Q:", references=["hi", "other"]), Record(prompt="ab", references=["c"])]
    stats = DataStats("t")
    examples = tokenize_records(recs, tok, stats, max_prompt_length=8, max_length=16)
    ds = SFTDataset(examples)
    # "Q:" = [84, 61]; "hi" = [107, 108]; + EOS.
    assert examples[0].ids == [84, 61, 107, 108, EOS] and examples[0].prompt_length == 2
    assert ds[0]["input_ids"].tolist() == [84, 61, 107, 108]
    assert ds[0]["labels"].tolist() == [-100, 107, 108, EOS]
    assert ds[1]["input_ids"].tolist() == [100, 101, 102]
    assert ds[1]["labels"].tolist() == [-100, 102, EOS]
    assert ds[0]["input_ids"].dtype == torch.long
    assert examples[0].references == ["hi", "other"]  # all references kept, the first one trained on
    assert ds.num_response_tokens() == 3 + 2
    assert (stats.read, stats.kept, stats.num_dropped, stats.truncated) == (2, 2, 0, 0)

    batch = SFTCollator(PAD)([ds[1], ds[0]])
    assert batch["input_ids"].tolist() == [[100, 101, 102, PAD], [84, 61, 107, 108]]
    assert batch["labels"].tolist() == [[-100, 102, EOS, -100], [-100, 107, 108, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert SFTCollator(PAD, pad_to_multiple_of=8)([ds[1]])["input_ids"].shape == (1, 8)


def test_prompt_batches_are_left_padded(tok):
    recs = [Record(prompt="abc", references=["x"]), Record(prompt="Q", references=["y", "z"])]
    prompts, stats = build_prompt_dataset(recs, tok, max_prompt_length=8)
    assert prompts[0]["input_ids"].tolist() == [100, 101, 102]
    batch = PromptCollator(PAD)([prompts[1], prompts[0]])
    assert batch["input_ids"].tolist() == [[PAD, PAD, 84], [100, 101, 102]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]
    assert batch["references"] == [["y", "z"], ["x"]]
    assert batch["index"].tolist() == [1, 0]
    # Evaluation truncates long prompts to their first max_prompt_length tokens; training drops them.
    truncated, s = build_prompt_dataset(recs, tok, max_prompt_length=2, overflow="truncate")
    assert truncated[0]["input_ids"].tolist() == [100, 101] and s.truncated == 1 and len(truncated) == 2
    dropped, s = build_prompt_dataset(recs, tok, max_prompt_length=2, overflow="drop")
    assert len(dropped) == 1 and dropped[0]["index"] == 1 and s.dropped == {PROMPT_TOO_LONG: 1}


def test_long_prompts_are_dropped_and_counted(tok):
    recs = [Record(prompt="x" * n, references=["r"]) for n in (3, 5, 6, 8, 0)]
    stats = DataStats("train", "mem")
    examples = tokenize_records(recs, tok, stats, max_prompt_length=5, max_length=12)
    assert [ex.index for ex in examples] == [0, 1]
    assert (stats.read, stats.kept) == (5, 2)
    assert stats.dropped == {"prompt_too_long": 2, "empty_prompt": 1}
    line = str(stats)
    assert "\n" not in line
    assert "5 read, 2 kept, 3 dropped" in line and "prompt > 5 tokens: 2" in line


def test_sequences_are_truncated_to_max_length(tok):
    recs = [Record(prompt="abc", references=["defgh"]), Record(prompt="ab", references=["c"])]
    stats = DataStats("t")
    examples = tokenize_records(recs, tok, stats, max_prompt_length=4, max_length=6)
    assert examples[0].ids == ids("abcdef") and examples[0].truncated  # EOS and "gh" cut off
    assert examples[1].ids == ids("abc") + [EOS] and not examples[1].truncated
    assert stats.truncated == 1
    item = SFTDataset(examples)[0]
    assert item["labels"].tolist() == [-100, -100] + ids("def")
    with pytest.raises(DataError, match="smaller than max_length"):
        tokenize_records(recs, tok, DataStats("t"), max_prompt_length=6, max_length=6)


# ------------------------------------------------------------------------------------------ the builder
def test_dev_split_limits_and_report(tok, tmp_path):
    rows = [{"instruction": f"i{k}", "output": f"o{k}"} for k in range(10)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(train=str(train), dev=None, dev_num=3, max_train_records=4, max_dev_records=2,
                     max_prompt_length=200, max_length=256)
    data = build_instruction_data(cfg, tok, seed=3)
    # Dev = the first dev_num records (then the first max_dev_records of them); train = the rest, limited.
    assert [p["references"] for p in data.dev_prompts] == [["o0"], ["o1"]]
    assert [p["references"] for p in data.train_prompts] == [["o3"], ["o4"], ["o5"], ["o6"]]
    assert [r.instruction for r in data.train_records] == ["i3", "i4", "i5", "i6"]
    assert len(data.train) == 4 and len(data.dev) == 2 and data.seed == 3
    first = data.train[0]
    prompt = reference_prompt("i3")
    assert first["input_ids"].tolist() == (ids(prompt) + ids("o3"))
    assert first["labels"].tolist() == [-100] * (len(ids(prompt)) - 1) + ids("o3") + [EOS]
    s = data.stats
    assert (s.train.total, s.train.split_off, s.train.limited, s.train.read, s.train.kept) == (10, 3, 3, 4, 4)
    assert (s.dev.total, s.dev.limited, s.dev.kept) == (3, 1, 2)
    assert "\n" not in str(s) and "3 split off as dev" in str(s)
    batch = data.prompt_collator([data.dev_prompts[0], data.dev_prompts[1]])
    assert batch["attention_mask"].sum().item() == 2 * len(ids(reference_prompt("i0")))

    dev = write_jsonl(tmp_path / "dev.jsonl", [{"prompt": "d", "output": "e"}])
    data = build_instruction_data(DataConfig(train=str(train), dev=str(dev)), tok)
    assert len(data.train) == 10 and [p["references"] for p in data.dev_prompts] == [["e"]]
    data = build_instruction_data(DataConfig(train=str(train), dev_num=0), tok)
    assert data.dev is None and data.dev_prompts is None and len(data.train) == 10
    with pytest.raises(DataError, match="has 10 records.*dev_num=10"):
        build_instruction_data(DataConfig(train=str(train), dev_num=10), tok)
    with pytest.raises(DataError, match="no training example is left"):
        build_instruction_data(DataConfig(train=str(train), dev_num=0, max_prompt_length=5, max_length=10), tok)


# ------------------------------------------------------------------------------------------ corpus
DOCS = ["hello world", "tiny", "a second line of text", "z"]


def expected_stream(docs: list[str]) -> list[int]:
    """The reference's document ending: the dump line's "\n", then EOS (process_data_pretrain.py)."""
    out: list[int] = []
    for d in docs:
        out += ids(d + "\n") + [EOS]
    return out


def test_pack_corpus_chunks_equal_the_eos_joined_stream(tok, tmp_path):
    src = tmp_path / "docs.txt"
    src.write_text("\n".join(DOCS[:2]) + "\n\n" + "\n".join(DOCS[2:]) + "\n")  # a blank line is no document
    corpus = pack_corpus(str(src), tok, tmp_path / "packed", seq_length=8)
    stream = expected_stream(DOCS)
    n = len(stream) // 8
    assert len(corpus) == n == 5
    assert isinstance(corpus.tokens, np.memmap) and corpus.tokens.dtype == np.uint16
    assert corpus.tokens.tolist() == np.asarray(stream[: n * 8]).reshape(n, 8).tolist()
    item = corpus[2]
    assert item["input_ids"].tolist() == stream[16:23] and item["labels"].tolist() == stream[17:24]
    assert item["input_ids"].dtype == torch.long
    meta = json.loads((tmp_path / "packed" / "meta.json").read_text())
    assert (meta["dtype"], meta["seq_length"], meta["num_chunks"], meta["num_documents"]) == ("uint16", 8, 5, 4)
    assert meta["dropped_tail_tokens"] == len(stream) - 40 and meta["vocab_size"] == len(tok)
    assert meta["sources"] == [str(src.resolve())] and len(meta["sha256"]) == 64
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == ["meta.json", "tokens.bin"]  # no temp left
    # Re-opening reads the same chunks; a truncated token file is refused.
    assert PackedCorpus(tmp_path / "packed")[4]["labels"].tolist() == stream[33:40]
    with open(tmp_path / "packed" / "tokens.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="re-pack"):
        PackedCorpus(tmp_path / "packed")


def test_pack_jsonl_glob_and_folder_sources(tok, tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"body": DOCS[0]}, {"body": "json keeps\nits newlines"}])
    (folder / "b.txt").write_text(DOCS[1] + "\nline one<@x(x!>line two\n")
    # Files in sorted order; in text files the reference's newline escape becomes "\n" again.
    docs = [DOCS[0], "json keeps\nits newlines", DOCS[1], "line one\nline two"]
    by_folder = pack_corpus(str(folder), tok, tmp_path / "f", seq_length=4, text_field="body")
    by_glob = pack_corpus([str(folder / "*.jsonl"), str(folder / "b.txt")], tok, tmp_path / "g", seq_length=4,
                          text_field="body")
    stream = expected_stream(docs)
    assert by_folder.tokens.tolist() == np.asarray(stream[: len(stream) // 4 * 4]).reshape(-1, 4).tolist()
    assert by_glob.tokens.tolist() == by_folder.tokens.tolist()
    assert pack_corpus(str(folder), tok, tmp_path / "m", seq_length=4, text_field="body", max_chunks=3).num_chunks == 3
    with pytest.raises(DataError, match=r"a.jsonl:1: missing field `text`"):
        pack_corpus(str(folder), tok, tmp_path / "x", seq_length=4)
    with pytest.raises(DataError, match="matches no file"):
        pack_corpus(str(tmp_path / "*.nothing"), tok, tmp_path / "x")
    with pytest.raises(DataError, match="fewer than one chunk"):
        pack_corpus(str(folder / "b.txt"), tok, tmp_path / "x", seq_length=64)
    with pytest.raises(DataError, match=r"someone/corpus.*unreachable.*local file"):
        pack_corpus("someone/corpus", tok, tmp_path / "x")
    with pytest.raises(DataError, match="does not exist"):
        pack_corpus(str(tmp_path / "no" / "such.txt"), tok, tmp_path / "x")


def test_token_dtype_threshold():
    assert token_dtype(50257) == np.uint16 and token_dtype(65534) == np.uint16
    assert token_dtype(65535) == np.int32 and token_dtype(151_936) == np.int32


def test_load_or_pack_corpus_reuses_the_cache(tok, tmp_path, monkeypatch):
    import minillm.data.pretrain as pretrain

    src = tmp_path / "docs.txt"
    src.write_text("\n".join(DOCS) + "\n")
    cfg = DataConfig(pretrain=str(src), pretrain_seq_length=8, cache_dir=str(tmp_path / "cache"))
    first = load_or_pack_corpus(cfg, tok)
    assert first.path.parent == tmp_path / "cache" / "corpus" and len(first) == 5

    def no_packing(*a, **k):
        raise AssertionError("the cached corpus should have been reused")

    monkeypatch.setattr(pretrain, "pack_corpus", no_packing)
    again = load_or_pack_corpus(cfg, tok)
    assert again.path == first.path and again.tokens.tolist() == first.tokens.tolist()
    # A folder that already holds a packed corpus is opened as it is.
    assert load_or_pack_corpus(DataConfig(pretrain=str(first.path), pretrain_seq_length=8), tok).path == first.path
    with pytest.raises(DataError, match="8-token chunks"):
        load_or_pack_corpus(DataConfig(pretrain=str(first.path), pretrain_seq_length=16), tok)
    from transformers import ByT5Tokenizer

    with pytest.raises(DataError, match="re-pack it with this tokenizer"):
        load_or_pack_corpus(DataConfig(pretrain=str(first.path), pretrain_seq_length=8), ByT5Tokenizer(extra_ids=0))
    monkeypatch.undo()
    # Another chunk length or an edited source is a different key, hence a fresh pack.
    other = load_or_pack_corpus(DataConfig(pretrain=str(src), pretrain_seq_length=4, cache_dir=cfg.cache_dir), tok)
    assert other.path != first.path and other.seq_length == 4
    src.write_text("\n".join(DOCS[:2]) + "\n")
    edited = load_or_pack_corpus(cfg, tok)
    assert edited.path != first.path and len(edited) == len(expected_stream(DOCS[:2])) // 8


# ------------------------------------------------------------------------------------------ sampler
def test_sampler_shards_are_disjoint_and_cover_the_epoch():
    n, world = 10, 3
    shards = [list(ResumableSampler(n, seed=5, rank=r, world_size=world)) for r in range(world)]
    assert [len(s) for s in shards] == [3, 3, 3]
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == 9 and set(flat) <= set(range(n))
    # The ranks stride one permutation drawn from torch.Generator(seed + epoch).
    g = torch.Generator()
    g.manual_seed(5)
    perm = torch.randperm(n, generator=g).tolist()
    assert shards == [perm[r:9:world] for r in range(world)]
    padded = [list(ResumableSampler(n, seed=5, rank=r, world_size=world, drop_last=False)) for r in range(world)]
    assert [len(s) for s in padded] == [4, 4, 4] and set(i for s in padded for i in s) == set(range(n))
    assert list(ResumableSampler(5, seed=0, shuffle=False)) == [0, 1, 2, 3, 4]


def test_sampler_order_changes_per_epoch_and_is_seeded():
    a = ResumableSampler(50, seed=1)
    e0 = list(a)
    a.set_epoch(1)
    e1 = list(a)
    assert e0 != e1 and sorted(e0) == sorted(e1) == list(range(50))
    b = ResumableSampler(50, seed=1)
    assert list(b) == e0
    b.set_epoch(1)
    assert list(b) == e1
    assert list(ResumableSampler(50, seed=2)) != e0
    assert list(a) == []  # the finished epoch yields nothing until the next set_epoch
    a.set_epoch(1)         # the same epoch keeps the position...
    assert list(a) == []
    a.set_epoch(2)         # ...a new epoch starts at 0
    assert len(list(a)) == 50


def _run(sampler: ResumableSampler, dataset, batches: int, start: list | None = None) -> list:
    """Micro-batches as the trainers draw them: a DataLoader per epoch, then set_epoch(epoch + 1)."""
    out = start if start is not None else []
    while len(out) < batches:
        for batch in DataLoader(dataset, batch_size=3, sampler=sampler, drop_last=True):
            out.append(batch.tolist())
            if len(out) == batches:
                return out
        sampler.set_epoch(sampler.epoch + 1)
    return out


@pytest.mark.parametrize("stop", [1, 3, 4, 7])  # 3 full batches per epoch per rank: stops at and inside epochs
def test_sampler_stop_and_resume_equals_uninterrupted(stop):
    dataset = list(range(100, 120))
    for rank in range(2):
        full = _run(ResumableSampler(20, seed=9, rank=rank, world_size=2), dataset, 10)
        first = ResumableSampler(20, seed=9, rank=rank, world_size=2)
        head = _run(first, dataset, stop)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
        resumed = ResumableSampler(20, seed=9, rank=rank, world_size=2)
        resumed.load_state_dict(state)
        assert _run(resumed, dataset, 10, start=list(head)) == full
    with pytest.raises(ValueError, match="world_size=2"):
        ResumableSampler(20, seed=9, world_size=1).load_state_dict(state)


def test_infinite_batches_cross_epochs_and_resume():
    dataset = [torch.tensor(i) for i in range(7)]
    sampler = ResumableSampler(7, seed=4)
    it = InfiniteBatches(dataset, sampler, batch_size=2)
    full = [next(it).tolist() for _ in range(10)]
    # 3 full batches per epoch (the 7th item is dropped), the epoch advancing by itself.
    for e in range(3):
        perm = ResumableSampler(7, seed=4).epoch_indices(e)
        assert full[3 * e: 3 * e + 3] == [perm[0:2], perm[2:4], perm[4:6]]
    for stop in (2, 3, 5):
        part = InfiniteBatches(dataset, ResumableSampler(7, seed=4), batch_size=2)
        head = [next(part).tolist() for _ in range(stop)]
        state = part.state_dict()
        fresh = InfiniteBatches(dataset, ResumableSampler(7, seed=4), batch_size=2)
        fresh.load_state_dict(state)
        assert head + [next(fresh).tolist() for _ in range(10 - stop)] == full
    with pytest.raises(ValueError, match="fewer than one batch"):
        InfiniteBatches(dataset, ResumableSampler(7, seed=4), batch_size=8)
