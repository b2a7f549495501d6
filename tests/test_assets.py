"""The committed tiny assets (tests/assets, built by scripts/build_test_assets.py) are complete and usable:
offline loading, tokenizer round trips, consistent special ids and vocab sizes, a peaked teacher, a near-uniform
student, and data files with the expected shapes and counts."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "tests" / "assets"
EOS, PAD = "<|endoftext|>", "<|pad|>"

# The reference template (lmops-notes §6), written out here independently of the build script.
TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
TEMPLATE_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def read_jsonl(name):
    return [json.loads(line) for line in (ASSETS / "data" / name).read_text(encoding="utf-8").splitlines()]


def prompt_of(record):
    if "prompt" in record:
        return record["prompt"]
    fmt = TEMPLATE_WITH_INPUT if record["input"] else TEMPLATE
    return fmt.format(instruction=record["instruction"], input=record["input"])


def first_reference(record):
    return record["output"] if isinstance(record["output"], str) else record["output"][0]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(ASSETS / name).eval() for name in ("teacher", "student")}


def dev_response_stats(model, tokenizer):
    """Teacher-forced mean CE and mean max-probability over dev response tokens + EOS, one record at a time
    (no padding involved), tokenised as the library does: prompt, then prompt+response with EOS appended."""
    ce_sum, max_prob_sum, count = 0.0, 0.0, 0
    for record in read_jsonl("dev.jsonl"):
        prompt = prompt_of(record)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = tokenizer(prompt + first_reference(record), add_special_tokens=False)["input_ids"]
        ids = torch.tensor(prompt_ids + full[len(prompt_ids):] + [tokenizer.eos_token_id])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids[None, :-1]).logits[0].float(), dim=-1)
        # logits row t predicts token t+1; the response starts at position len(prompt_ids).
        rows = logprobs[len(prompt_ids) - 1:]
        targets = ids[len(prompt_ids):]
        ce_sum += -rows.gather(-1, targets[:, None]).sum().item()
        max_prob_sum += rows.max(dim=-1).values.exp().sum().item()
        count += len(targets)
    return ce_sum / count, max_prob_sum / count


# ----------------------------------------------------------------------------------------- data
def test_train_and_dev_records_have_the_expected_shapes_and_counts(tokenizer):
    for name, count in (("train.jsonl", 300), ("dev.jsonl", 40)):
        records = read_jsonl(name)
        assert len(records) == count
        shapes = {tuple(sorted(r)) for r in records}
        assert shapes == {("input", "instruction", "output"), ("output", "prompt")}, shapes
        assert any(r.get("input") == "" for r in records) and any(r.get("input") for r in records)
        for r in records:
            refs = [r["output"]] if isinstance(r["output"], str) else r["output"]
            assert refs and all(isinstance(x, str) and x for x in refs)
            for ref in refs:  # responses are short
                assert len(tokenizer(ref, add_special_tokens=False)["input_ids"]) <= 20
            if "prompt" in r:
                # A pre-formatted prompt is exactly the reference template around some instruction (and input).
                body = r["prompt"].split("### Instruction:\n", 1)[1].removesuffix("\n\n### Response:\n")
                instruction, _, input_text = body.partition("\n\n### Input:\n")
                fmt = TEMPLATE_WITH_INPUT if input_text else TEMPLATE
                assert r["prompt"] == fmt.format(instruction=instruction, input=input_text)
            else:
                assert all(isinstance(r[k], str) for k in ("instruction", "input"))
    # Some dev records carry several references (multi-reference scoring); train uses single strings.
    assert any(isinstance(r["output"], list) and len(r["output"]) > 1 for r in read_jsonl("dev.jsonl"))
    assert all(isinstance(r["output"], str) for r in read_jsonl("train.jsonl"))


def test_data_files_load_through_the_library():
    from minillm.data import load_records

    train = load_records(str(ASSETS / "data" / "train.jsonl"))
    dev = load_records(str(ASSETS / "data" / "dev.jsonl"))
    assert len(train) == 300 and len(dev) == 40
    with_prompt = sum(r.prompt is not None for r in train)
    assert 0 < with_prompt < 300


def test_prompts_fit_the_tiny_configs(tokenizer):
    # configs/tiny use max_prompt_length 96 (minillm) and 128: no record may be dropped as too long.
    lengths = [len(tokenizer(prompt_of(r), add_special_tokens=False)["input_ids"])
               for name in ("train.jsonl", "dev.jsonl") for r in read_jsonl(name)]
    assert max(lengths) <= 96


def test_pretrain_and_seqkd_files():
    lines = (ASSETS / "data" / "pretrain.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 200 and all(line.strip() for line in lines)
    seqkd = read_jsonl("seqkd.jsonl")
    train_prompts = [prompt_of(r) for r in read_jsonl("train.jsonl")]
    assert [r["prompt"] for r in seqkd] == train_prompts  # one teacher sample per train prompt, in order
    assert all(set(r) == {"prompt", "output"} and isinstance(r["output"], str) for r in seqkd)


# ----------------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("folder", ["tokenizer", "teacher", "student"])
def test_tokenizer_loads_offline_and_round_trips(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / folder)
    assert len(tok) == 512
    assert tok.eos_token == EOS and tok.pad_token == PAD and tok.bos_token == EOS
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.convert_ids_to_tokens([tok.eos_token_id, tok.pad_token_id]) == [EOS, PAD]
    # byte-level BPE: any text, including characters never seen in training, decodes back exactly.
    for text in ["Reverse the order of the words.\n\n### Input:\ncat dog", "Grüße, 世界 🙂\n\ttabs  and  spaces ",
                 prompt_of(read_jsonl("dev.jsonl")[0]), ""]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
    # encoding adds no special tokens of its own (the library appends EOS itself)
    assert tok("cat")["input_ids"] == tok("cat", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in tok("cat")["input_ids"]


def test_template_text_compresses_well(tokenizer):
    # The BPE was trained on the template, so its boilerplate is a few dozen tokens, not ~170 bytes.
    boilerplate = TEMPLATE.format(instruction="x")
    assert len(tokenizer(boilerplate, add_special_tokens=False)["input_ids"]) < 40


def test_chat_template(tokenizer):
    messages = [{"role": "user", "content": "Add 3 and 4."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "### User:\nAdd 3 and 4.\n\n### Assistant:\n")
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "### User:\nAdd 3 and 4.\n\n"
    full = messages + [{"role": "assistant", "content": "7"}]
    assert tokenizer.apply_chat_template(full, tokenize=False) == (
        f"### User:\nAdd 3 and 4.\n\n### Assistant:\n7{EOS}\n\n")
    ids = tokenizer.apply_chat_template(full, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tokenizer.eos_token_id in list(ids)


# ----------------------------------------------------------------------------------------- models
def test_models_load_offline_with_consistent_config(tokenizer, models):
    for name, model in models.items():
        cfg = model.config
        assert type(model).__name__ == "LlamaForCausalLM"
        assert cfg.vocab_size == len(tokenizer) == model.get_input_embeddings().weight.shape[0]
        assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
        assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (
            tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id), name
        gen = model.generation_config
        assert (gen.pad_token_id, gen.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id), name
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert (ASSETS / name / "model.safetensors").is_file()
    teacher, student = models["teacher"].config, models["student"].config
    assert (teacher.num_hidden_layers, teacher.hidden_size, teacher.num_attention_heads,
            teacher.intermediate_size) == (2, 64, 4, 128)
    assert (student.num_hidden_layers, student.hidden_size, student.num_attention_heads,
            student.intermediate_size) == (2, 32, 2, 64)
    n_teacher = sum(p.numel() for p in models["teacher"].parameters())
    n_student = sum(p.numel() for p in models["student"].parameters())
    assert n_student < n_teacher / 2


def test_assets_are_small():
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total < 5_000_000, f"tests/assets is {total / 1e6:.1f} MB"


def test_teacher_is_peaked_and_student_is_near_uniform(tokenizer, models):
    log_v = math.log(len(tokenizer))
    t_loss, t_max_prob = dev_response_stats(models["teacher"], tokenizer)
    s_loss, s_max_prob = dev_response_stats(models["student"], tokenizer)
    assert t_max_prob > 0.5, t_max_prob
    assert t_loss < 0.3 * log_v, (t_loss, log_v)
    # A random init with std 0.02 gives nearly flat logits: uniform is 1/512 ≈ 0.002 and CE = log V.
    assert s_max_prob < 0.01, s_max_prob
    assert abs(s_loss - log_v) < 0.2, (s_loss, log_v)


def test_teacher_greedy_answers_most_dev_prompts(models):
    """Greedy decoding with left padding (the library's prompt batches) reproduces most dev answers."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "teacher", padding_side="left")
    dev = read_jsonl("dev.jsonl")
    enc = tok([prompt_of(r) for r in dev], add_special_tokens=False, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = models["teacher"].generate(**enc, do_sample=False, max_new_tokens=16)
    texts = [t.strip() for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    correct = sum(t in ([r["output"]] if isinstance(r["output"], str) else r["output"]) for t, r in zip(texts, dev))
    assert correct >= 0.5 * len(dev), list(zip(texts, [r["output"] for r in dev]))


# ----------------------------------------------------------------------------------------- rebuild
@pytest.mark.slow
def test_build_script_reproduces_the_committed_assets(tmp_path, tokenizer):
    """Rebuilding gives byte-identical data, tokenizer, configs and student weights (pure seeded RNG), and a
    teacher as good as the committed one (trained float weights may differ in the last bits on another CPU)."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "build_test_assets.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    same = ["data/train.jsonl", "data/dev.jsonl", "data/pretrain.txt", "data/routed.jsonl",
            "student/model.safetensors"]
    for folder in ("tokenizer", "teacher", "student", "teacher-b"):
        same += [f"{folder}/{f.name}" for f in (ASSETS / folder).iterdir() if f.name != "model.safetensors"]
    for rel in same:
        if rel.endswith("config.json"):
            # HF stamps the installed transformers version into its configs; everything else must match.
            unstamp = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if k != "transformers_version"}
            assert unstamp(tmp_path / rel) == unstamp(ASSETS / rel), rel
        else:
            assert (tmp_path / rel).read_bytes() == (ASSETS / rel).read_bytes(), rel
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        p.relative_to(ASSETS) for p in ASSETS.rglob("*") if p.is_file() and p.name != "README.md")
    from transformers import AutoModelForCausalLM

    committed = dev_response_stats(AutoModelForCausalLM.from_pretrained(ASSETS / "teacher").eval(), tokenizer)
    rebuilt = dev_response_stats(AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval(), tokenizer)
    assert rebuilt == pytest.approx(committed, abs=0.05)
