"""minillm-eval on the tiny assets: output tree, seeds, truncation, teacher scores, Dist-4, judge, config file."""

import json
import subprocess
import sys

import numpy as np
import pytest

from minillm.cli.eval import main as eval_main

COMMON = ["--max-new-tokens", "12", "--batch-size", "4", "--no-progress"]
pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny-model generations: see conftest.py


@pytest.fixture(scope="module")
def two_model_run(tmp_path_factory):
    from conftest import ASSETS

    out = tmp_path_factory.mktemp("eval")
    argv = ["--model", str(ASSETS / "student"), str(ASSETS / "teacher"), "--name", "stu", "tea",
            "--data", str(ASSETS / "data" / "dev.jsonl"), "--out", str(out / "a"), "--seeds", "10", "20",
            "--num", "8", "--dist", *COMMON]
    assert eval_main(argv) == 0
    # The same seed again, alone, into another folder: must reproduce seed 10 exactly.
    argv_b = [a if a != str(out / "a") else str(out / "b") for a in argv]
    argv_b[argv_b.index("--seeds") + 1: argv_b.index("--seeds") + 3] = ["10"]
    assert eval_main(argv_b) == 0
    return out


def _load(path):
    return json.loads(path.read_text())


def test_cli_import_does_not_load_torch():
    code = ("import sys, minillm.cli.eval, minillm.cli.generate, minillm.cli.data; "
            "heavy = [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules]; "
            "assert not heavy, heavy; "
            "[m.make_parser() for m in (minillm.cli.eval, minillm.cli.generate, minillm.cli.data)]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_outputs_seeds_and_side_by_side(two_model_run, capsys):
    a, b = two_model_run / "a", two_model_run / "b"
    for model in ("stu", "tea"):
        s10, s20 = _load(a / model / "dev" / "seed10.json"), _load(a / model / "dev" / "seed20.json")
        assert s10["num"] == len(s10["samples"]) == 8
        assert set(s10["samples"][0]) == {"prompt", "output", "references"}
        # Same seed, separate run: identical samples and metrics; different seed: different samples.
        assert _load(b / model / "dev" / "seed10.json") == s10
        assert [x["output"] for x in s10["samples"]] != [x["output"] for x in s20["samples"]]
    results = _load(a / "results.json")
    assert set(results["results"]) == {"stu", "tea"}
    entry = results["results"]["tea"]["dev"]
    values = [entry["seeds"][s]["rougeL"] for s in ("10", "20")]
    assert entry["mean"]["rougeL"] == pytest.approx(np.mean(values))
    assert entry["std"]["rougeL"] == pytest.approx(np.std(values))  # population std (ddof=0)
    assert "samples" not in entry["seeds"]["10"]
    assert results["settings"]["seeds"] == [10, 20]
    # The trained teacher beats the random student; the table has one row per model, "mean ± std" cells.
    assert entry["mean"]["rougeL"] > results["results"]["stu"]["dev"]["mean"]["rougeL"]
    table = (a / "table.md").read_text().splitlines()
    assert table[0] == "| model | dev |"
    assert table[2] == f"| stu | {results['results']['stu']['dev']['mean']['rougeL']:.2f} ± " \
                       f"{results['results']['stu']['dev']['std']['rougeL']:.2f} |"
    assert table[3].startswith("| tea | ")


def test_dist4_by_hand(two_model_run):
    seed = _load(two_model_run / "a" / "stu" / "dev" / "seed20.json")
    grams, total = set(), 0
    for sample in seed["samples"]:
        words = sample["output"].split()
        for i in range(len(words) - 3):
            grams.add(tuple(words[i:i + 4]))
            total += 1
    assert seed["dist4"] == pytest.approx(100.0 * len(grams) / total)


def test_prompts_are_cut_to_their_first_tokens(tmp_path, assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    long_prompt = "### Instruction:\n" + "Repeat the word: ship " * 20 + "\n\n### Response:\n"
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": long_prompt, "output": "ship"}) + "\n"
                    + json.dumps({"instruction": "Add 1 and 2.", "output": "3"}) + "\n")
    ids = tok(long_prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) > 10
    assert eval_main(["--model", str(assets / "student"), "--data", str(data), "--out", str(tmp_path / "o"),
                      "--seeds", "10", "--max-prompt-length", "10", *COMMON]) == 0
    samples = _load(tmp_path / "o" / "student" / "long" / "seed10.json")["samples"]
    assert samples[0]["prompt"] == tok.decode(ids[:10])  # the FIRST 10 tokens, not dropped, not the last 10
    # The instruction-only record gets the reference template (cut as well).
    from minillm.data import reference_prompt
    templ = tok(reference_prompt("Add 1 and 2."), add_special_tokens=False)["input_ids"]
    assert samples[1]["prompt"] == tok.decode(templ[:10])
    # The dataset itself holds exactly those ids.
    from minillm.evaluation.runner import load_eval_set
    from minillm.evaluation.settings import EvalSettings

    eval_set = load_eval_set(str(data), "long", tok, EvalSettings(max_prompt_length=10))
    assert eval_set.prompts.prompt_ids[0] == ids[:10]
    assert eval_set.stats.truncated == 2 and eval_set.stats.kept == 2


def test_teacher_logprob_matches_independent_teacher_forcing(tmp_path, assets):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert eval_main(["--model", str(assets / "student"), "--teacher", str(assets / "teacher"),
                      "--data", str(assets / "data" / "dev.jsonl"), "--out", str(tmp_path), "--num", "4",
                      "--seeds", "30", "--max-new-tokens", "10", "--batch-size", "1", "--no-progress"]) == 0
    got = _load(tmp_path / "student" / "dev" / "seed30.json")
    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    student = AutoModelForCausalLM.from_pretrained(assets / "student").eval()
    teacher = AutoModelForCausalLM.from_pretrained(assets / "teacher").eval()
    lines = (assets / "data" / "dev.jsonl").read_text().splitlines()[:4]
    from minillm.data import parse_record, render_prompt

    total, count, k3s = 0.0, 0, []
    torch.manual_seed(30)  # batch size 1: the same random stream as the CLI's single batch per prompt
    with torch.no_grad():
        for i, line in enumerate(lines):
            prompt = render_prompt(parse_record(json.loads(line), "dev", i + 1), tok)
            ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
            out = student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                   top_p=1.0, temperature=1.0, max_new_tokens=10, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id)
            response = out[0, ids.shape[1]:].tolist()
            if tok.eos_token_id in response:
                response = response[: response.index(tok.eos_token_id) + 1]
            full = torch.tensor([ids[0].tolist() + response])
            p = ids.shape[1]
            t_lp = torch.log_softmax(teacher(full).logits[0, p - 1:-1].double(), -1)
            s_lp = torch.log_softmax(student(full).logits[0, p - 1:-1].double(), -1)
            target = torch.tensor(response)
            t_tok = t_lp.gather(-1, target[:, None])[:, 0]
            s_tok = s_lp.gather(-1, target[:, None])[:, 0]
            total += float(t_tok.sum())
            count += len(response)
            d = t_tok - s_tok
            k3s.append(float((d.exp() - 1 - d).mean()))
            assert got["samples"][i]["output"] == tok.decode(response, skip_special_tokens=True).strip()
    assert got["teacher_logprob"] == pytest.approx(total / count, rel=1e-4)
    assert got["reverse_kl_k3"] == pytest.approx(sum(k3s) / len(k3s), rel=1e-4)


def test_judge_through_fake_openai_server(tmp_path, assets, monkeypatch):
    from test_judge import KEY, FakeJudge

    records = [json.loads(x) for x in (assets / "data" / "dev.jsonl").read_text().splitlines()[:3]]
    fake = FakeJudge()
    try:
        for i, r in enumerate(records):
            question = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") if "instruction" in r \
                else r["prompt"]
            fake.script[question] = [(200, f"8 {2 * (i + 1)}\nfine")]  # reference 8, model 2/4/6
        monkeypatch.setenv("MINILLM_JUDGE_BASE_URL", fake.base_url)
        monkeypatch.setenv("MINILLM_JUDGE_API_KEY", KEY)
        monkeypatch.setenv("MINILLM_JUDGE_MODEL", "judge-x")
        assert eval_main(["--model", str(assets / "teacher"), "--data", str(assets / "data" / "dev.jsonl"),
                          "--out", str(tmp_path), "--num", "3", "--seeds", "10", "--judge", *COMMON]) == 0
    finally:
        fake.close()
    seed = _load(tmp_path / "teacher" / "dev" / "seed10.json")
    assert seed["judge"] == pytest.approx(100 * (2 + 4 + 6) / 24)
    assert [s["judge_scores"] for s in seed["samples"]] == [[8.0, 2.0], [8.0, 4.0], [8.0, 6.0]]
    assert fake.requests[0]["body"]["model"] == "judge-x"
    assert _load(tmp_path / "results.json")["results"]["teacher"]["dev"]["mean"]["judge"] == pytest.approx(50.0)
    assert not any(KEY in p.read_text() for p in tmp_path.rglob("*.json"))


def test_config_file_and_flag_precedence(tmp_path):
    from minillm.evaluation.settings import SettingsError, resolve_settings

    cfg = tmp_path / "eval.yaml"
    cfg.write_text("model: [a, b]\nname: [A, B]\ndata: dolly\nout: o\nseeds: [10, 20]\nmax-new-tokens: 32\n"
                   "dist: true\n")
    s = resolve_settings({"seeds": [40], "config": str(cfg)}, str(cfg))
    assert s.seeds == [40] and s.max_new_tokens == 32 and s.data == ["dolly"] and s.dist and s.top_k == 0
    cfg.write_text("model: a\ndata: dolly\nout: o\nseed: 3\n")
    with pytest.raises(SettingsError, match="unknown key `seed`"):
        resolve_settings({}, str(cfg))
    cfg.write_text("model: a\ndata: dolly\nout: o\nbatch_size: many\n")
    with pytest.raises(SettingsError, match="batch_size` must be an integer"):
        resolve_settings({}, str(cfg))
    with pytest.raises(SettingsError, match="--exposure-bias"):
        resolve_settings({"model": ["a"], "data": ["d"], "out": "o", "exposure_bias": True})


def test_model_and_set_names():
    from minillm.evaluation.runner import model_names, set_names

    assert model_names(["runs/sft/best", "runs/kd/best", "x/teacher"]) == ["sft/best", "kd/best", "teacher"]
    assert model_names(["a", "b"], ["A", "B"]) == ["A", "B"]
    assert set_names(["dolly", "data/dev.jsonl", "MiniLLM/Vicuna"]) == ["dolly", "dev", "Vicuna"]


def test_analyses_lm_loss_exposure_bias_and_calibration(tmp_path, assets):
    from minillm.evaluation.analysis import calibration_report, reference_lm_loss
    from minillm.data import reference_prompt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sst = tmp_path / "sst2.jsonl"
    rows = [("a bright and lovely day", 1), ("a grim dull cold mess", 0), ("green leaf", 1), ("bad", "negative")]
    sst.write_text("".join(json.dumps({"sentence": s, "label": y}) + "\n" for s, y in rows))
    assert eval_main(["--model", str(assets / "student"), "--teacher", str(assets / "teacher"),
                      "--data", str(assets / "data" / "dev.jsonl"), "--out", str(tmp_path / "o"), "--num", "6",
                      "--seeds", "10", "--lm-loss", "--exposure-bias", "--calibration", "sst2",
                      "--calibration-data", str(sst), *COMMON]) == 0
    results = _load(tmp_path / "o" / "results.json")
    analyses = results["results"]["student"]["dev"]["analyses"]
    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    student = AutoModelForCausalLM.from_pretrained(assets / "student")
    from minillm.data import load_records, render_prompt

    recs = load_records(str(assets / "data" / "dev.jsonl"))[:6]
    expected = reference_lm_loss(student, tok, [render_prompt(r, tok) for r in recs],
                                 [r.references[0] for r in recs], max_length=256 + 12)
    assert analyses["lm_loss"] == pytest.approx(expected, rel=1e-5)
    curve = analyses["exposure_bias_curve"]
    assert 1 <= analyses["ex_acc_err_at"] <= 12
    assert analyses["ex_acc_err"] == pytest.approx(curve["ex_acc_err"][analyses["ex_acc_err_at"] - 1])
    calib = results["calibration"]["student"]
    from minillm.evaluation.extras import CALIBRATION_TASKS

    prompts = [reference_prompt(CALIBRATION_TASKS["sst2"]["instruction"], s) for s, _ in rows]
    direct = calibration_report(student, tok, prompts, ["negative", "positive"], [1, 0, 1, 0])
    assert calib["n"] == 4 and calib["ece"] == pytest.approx(direct["ece"], abs=1e-6)
    assert calib["accuracy"] == pytest.approx(direct["accuracy"])


def test_calibration_offline_hub_and_bad_rows(tmp_path):
    from minillm.data import DataError
    from minillm.evaluation.extras import _calibration_example, load_calibration_rows

    with pytest.raises(DataError, match="offline|unreachable|huggingface-cli download"):
        load_calibration_rows("boolq", None)
    with pytest.raises(DataError, match=r"f.jsonl:2: missing field `passage`"):
        _calibration_example("boolq", {"question": "is it", "answer": True}, "f.jsonl:2")
    record, label = _calibration_example("boolq", {"question": "is it", "passage": "P", "answer": True}, "x")
    assert label == 1 and record.input == "P" and record.instruction.endswith("Question: Is it?")


def test_generate_texts_and_generate_batches_agree(assets):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minillm.data import PromptCollator
    from minillm.evaluation.generation import generate_batches, generate_texts

    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(assets / "teacher")
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Add 1 and 2.", "Name the capital of Norway. x")]
    batch = PromptCollator(tok.pad_token_id)([{"input_ids": torch.tensor(i)} for i in ids])
    kwargs = dict(max_new_tokens=8, seed=3)
    texts = generate_texts(model, tok, [batch], **kwargs)
    (got,) = generate_batches(model, tok, [batch], **kwargs)
    assert got.texts == texts
    assert got.response_ids.shape[0] == 2 and got.input_ids.equal(batch["input_ids"])
    assert [t.strip() for t in tok.batch_decode(got.response_ids, skip_special_tokens=True)] == texts


def test_shipped_eval_config_resolves():
    from conftest import REPO

    from minillm.evaluation.settings import DEFAULT_SEEDS, EVAL_SETS, resolve_settings

    s = resolve_settings({}, str(REPO / "configs" / "eval" / "gpt2-base.yaml"))
    assert s.data == list(EVAL_SETS) and s.seeds == DEFAULT_SEEDS and len(s.model) == len(s.name) == 5
    assert (s.temperature, s.top_k, s.top_p, s.max_new_tokens, s.max_prompt_length) == (1.0, 0, 1.0, 256, 256)


def test_named_set_offline_fails_fast_with_advice(tmp_path, assets, capsys):
    assert eval_main(["--model", str(assets / "student"), "--data", "vicuna", "--out", str(tmp_path),
                      "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "MiniLLM/Vicuna" in err and "huggingface-cli download" in err
    assert not (tmp_path / "results.json").exists()


def test_fast_engine_greedy_equals_hf_generate_and_samples_reproducibly(assets):
    """--engine fast (the rollout engine at α = 0) decodes greedily to exactly HF generate's tokens, batched
    prompts of different lengths included; sampled, it is reproducible per seed, leaves the caller's RNG alone
    and pads rows after their EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minillm.data import PromptCollator
    from minillm.evaluation.generation import generate_batches

    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(assets / "teacher")
    prompts = ("Add 1 and 2.", "Name the capital of Norway. x", "Write a haiku about rain and the sea, please.")
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in prompts]
    batch = PromptCollator(tok.pad_token_id)([{"input_ids": torch.tensor(i)} for i in ids])
    greedy = dict(max_new_tokens=24, do_sample=False)
    (hf,) = generate_batches(model, tok, [batch], engine="hf", **greedy)
    (fast,) = generate_batches(model, tok, [batch], engine="fast", **greedy)
    assert fast.texts == hf.texts and any(fast.texts)
    assert torch.equal(fast.response_ids, hf.response_ids[:, :fast.response_ids.shape[1]])

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    (a,) = generate_batches(model, tok, [batch], engine="fast", max_new_tokens=24, seed=7)
    assert torch.equal(torch.rand(1), before)  # the caller's random stream is untouched
    (b,) = generate_batches(model, tok, [batch], engine="fast", max_new_tokens=24, seed=7)
    (c,) = generate_batches(model, tok, [batch], engine="fast", max_new_tokens=24, seed=8)
    assert a.texts == b.texts and torch.equal(a.response_ids, b.response_ids) and a.texts != c.texts
    for row in a.response_ids:
        ends = (row == tok.eos_token_id).nonzero()
        if len(ends):
            assert (row[int(ends[0]) + 1:] == tok.pad_token_id).all()


def test_engine_choice_auto_hf_fast():
    import torch

    from minillm.evaluation.generation import resolve_engine
    from minillm.evaluation.settings import EvalSettings, SettingsError

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_engine("auto", cpu) == "hf" and resolve_engine("auto", cuda) == "fast"
    assert resolve_engine("auto", cuda, no_repeat_ngram_size=3) == "hf"
    assert resolve_engine("auto", cuda, synced_gpus=True) == "hf"
    assert resolve_engine("fast", cpu) == "fast" and resolve_engine("hf", cuda) == "hf"
    with pytest.raises(ValueError, match="no-repeat-ngram-size"):
        resolve_engine("fast", cpu, no_repeat_ngram_size=3)
    with pytest.raises(ValueError, match="ZeRO-3"):
        resolve_engine("fast", cuda, synced_gpus=True)
    base = dict(model=["m"], data=["d"], out="o")
    with pytest.raises(SettingsError, match="--engine must be"):
        EvalSettings(**base, engine="vllm").check()
    with pytest.raises(SettingsError, match=r"--engine fast cannot run ZeRO-3 sharded models \(--zero3\)"):
        EvalSettings(**base, engine="fast", zero3=True).check()
    with pytest.raises(SettingsError, match="--engine fast does not implement --no-repeat-ngram-size"):
        EvalSettings(**base, engine="fast", no_repeat_ngram_size=3).check()


def test_cli_with_the_fast_engine(tmp_path, assets):
    """minillm-eval --engine fast end to end on CPU: the teacher's samples, its settings recorded, and its Rouge-L
    recomputed from the saved samples."""
    from minillm.evaluation import rouge_l

    out = tmp_path / "fast"
    argv = ["--model", str(assets / "teacher"), "--name", "tea", "--data", str(assets / "data" / "dev.jsonl"),
            "--out", str(out), "--seeds", "10", "--num", "4", "--engine", "fast", *COMMON]
    assert eval_main(argv) == 0
    results = _load(out / "results.json")
    assert results["settings"]["engine"] == "fast"
    seed = _load(out / "tea" / "dev" / "seed10.json")
    assert seed["num"] == len(seed["samples"]) == 4 and any(x["output"] for x in seed["samples"])
    expected = rouge_l([x["output"] for x in seed["samples"]], [x["references"] for x in seed["samples"]])
    assert results["results"]["tea"]["dev"]["seeds"]["10"]["rougeL"] == pytest.approx(expected, abs=1e-6)
    assert expected > 0  # the trained teacher's samples overlap the references


@pytest.mark.gpu
def test_fast_engine_on_cuda_decodes_greedily_like_hf_generate(assets):
    """On CUDA, --engine auto is the fast engine with static caches and CUDA graphs: greedy tokens equal HF
    generate's (fp32)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minillm.data import PromptCollator
    from minillm.evaluation.generation import generate_batches

    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(assets / "teacher").cuda()
    prompts = ("Add 1 and 2.", "Name the capital of Norway. x", "Write a haiku about rain and the sea, please.")
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in prompts]
    batch = PromptCollator(tok.pad_token_id)([{"input_ids": torch.tensor(i)} for i in ids])
    (hf,) = generate_batches(model, tok, [batch], engine="hf", max_new_tokens=24, do_sample=False)
    (fast,) = generate_batches(model, tok, [batch], engine="auto", max_new_tokens=24, do_sample=False)
    assert fast.texts == hf.texts


def test_multi_reference_rouge_l_end_to_end(tmp_path, assets):
    """Records with several references are scored against the best one (max over references), end to end through
    minillm-eval; the oracle is rouge_score itself (Porter stemmer, F-measure, x100), not the library's helper. The
    first reference of every record is a decoy, so a run that read only the first would score about 0."""
    from rouge_score import rouge_scorer

    from minillm.data import load_records, render_prompt

    records = load_records(str(assets / "data" / "dev.jsonl"))[:4]
    data = tmp_path / "multi.jsonl"
    rows = [{"prompt": render_prompt(r, None, "auto"), "output": ["zebra quartz xylophone", r.references[0]]}
            for r in records]
    data.write_text("".join(json.dumps(x) + "\n" for x in rows))
    out = tmp_path / "eval"
    assert eval_main(["--model", str(assets / "teacher"), "--name", "tea", "--data", str(data), "--out", str(out),
                      "--seeds", "10", *COMMON]) == 0
    seed = _load(out / "tea" / "multi" / "seed10.json")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    best = [max(scorer.score(ref, s["output"])["rougeL"].fmeasure for ref in s["references"]) for s in seed["samples"]]
    first_only = [scorer.score(s["references"][0], s["output"])["rougeL"].fmeasure for s in seed["samples"]]
    got = _load(out / "results.json")["results"]["tea"]["multi"]["seeds"]["10"]["rougeL"]
    assert [s["references"] for s in seed["samples"]] == [x["output"] for x in rows]
    assert got == pytest.approx(100 * sum(best) / len(best), abs=1e-6)
    assert got > 100 * sum(first_only) / len(first_only) + 5
