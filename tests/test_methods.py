"""Issue 8, one harness for every distillation objective: student-generated batches (GKD), DistiLLM's adaptive
schedule and replay buffer, the MiniLLM alternatives (single-step only, ranking), their config checks, exact
resume of the on-policy KD path and the comparison script over every method on the tiny assets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm.config import ConfigError, KDConfig, load_config
from minillm.data.collate import PromptCollator, SFTCollator
from minillm.data.instruction import sft_item
from minillm.trainers.ranking import duplicate_prompts, pair_permutation
from minillm.trainers.student_data import (
    FIXED,
    FRESH,
    REPLAY,
    AdaptiveSchedule,
    ReplayBuffer,
    StudentData,
    prompt_lengths,
)

REPO = Path(__file__).resolve().parent.parent
# tiny models: more intra-op threads only add overhead (several times the time when the cores are shared), for the
# in-process runs here and the CLI processes (OMP_NUM_THREADS=1) alike
pytestmark = pytest.mark.usefixtures("one_thread")
PAD, EOS = 0, 2


# ------------------------------------------------------------------------------------------ helpers
def sft_batch():
    """Two right-padded SFT rows: prompts [5, 6, 7] and [8, 9], references [10, 11, EOS] and [12, EOS]."""
    return SFTCollator(PAD)([sft_item([5, 6, 7, 10, 11, EOS], 3), sft_item([8, 9, 12, EOS], 2)])


class FakeSampler:
    """sample_fn stand-in: responses that depend on the prompt and on the generator (so resume is testable).

    Row r answers [100 + g, 101 + g, EOS, 55] with g a draw from the generator, cut after EOS by the mask; row 1
    never stops (no EOS within the 3 tokens), to cover the no-EOS case.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, prompt_ids, prompt_mask, generator):
        self.calls.append((prompt_ids.clone(), prompt_mask.clone()))
        g = int(torch.randint(0, 50, (1,), generator=generator))
        ids = torch.tensor([[100 + g, 101 + g, EOS], [200 + g, 201 + g, 202 + g]])
        mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
        return ids, mask


def student_data(micro=2, total=10, rank=0, **kd):
    cfg = KDConfig(**kd)
    sampler = FakeSampler()
    sd = StudentData(cfg, seed=10, rank=rank, micro_batch_size=micro, total_steps=total,
                     sft_collator=SFTCollator(PAD), prompt_collator=PromptCollator(PAD), sample_fn=sampler)
    return sd, sampler


# ------------------------------------------------------------------------------------------ the batch transformation
def test_prompt_lengths_come_from_the_label_mask():
    batch = sft_batch()
    assert prompt_lengths(batch["labels"]).tolist() == [3, 2]
    with pytest.raises(ValueError, match="no response label"):
        prompt_lengths(torch.full((1, 4), -100))


def test_sampled_batch_masks_the_prompt_and_covers_sampled_tokens_through_eos():
    sd, sampler = student_data(on_policy_fraction=1.0)
    out, source = sd.prepare(sft_batch(), step=0)
    assert source == FRESH
    # the sampler saw the prompts left-padded: [5, 6, 7] and [PAD, 8, 9]
    prompt_ids, prompt_mask = sampler.calls[0]
    assert prompt_ids.tolist() == [[5, 6, 7], [PAD, 8, 9]] and prompt_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    g = out["input_ids"][0, 3].item() - 100
    # row 0: prompt + [100+g, 101+g, EOS]; labels predict only the response (EOS included)
    assert out["input_ids"][0].tolist() == [5, 6, 7, 100 + g, 101 + g]
    assert out["labels"][0].tolist() == [-100, -100, 100 + g, 101 + g, EOS]
    # row 1 (no EOS in the sampled tokens): every sampled token is a label; right-padded after
    assert out["input_ids"][1].tolist() == [8, 9, 200 + g, 201 + g, PAD]
    assert out["labels"][1].tolist() == [-100, 200 + g, 201 + g, 202 + g, -100]
    assert out["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 1, 0]]


def test_response_mask_cuts_after_the_first_eos():
    sd, _ = student_data(on_policy_fraction=1.0)
    sd.sample_fn = lambda ids, mask, g: (torch.tensor([[30, EOS, 31], [EOS, 40, 41]]),
                                         torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    out, _ = sd.prepare(sft_batch(), step=0)
    assert out["labels"].tolist() == [[-100, -100, 30, EOS], [-100, EOS, -100, -100]]
    assert out["input_ids"].tolist() == [[5, 6, 7, 30], [8, 9, PAD, PAD]]


def test_fraction_zero_leaves_batches_untouched_and_one_always_samples():
    zero, sampler = student_data(on_policy_fraction=0.0)
    assert not StudentData.active(KDConfig(on_policy_fraction=0.0))
    for step in range(20):
        batch = sft_batch()
        out, source = zero.prepare(batch, step)
        assert out is batch and source == FIXED
    assert sampler.calls == []
    one, sampler = student_data(on_policy_fraction=1.0)
    assert all(one.prepare(sft_batch(), s)[1] == FRESH for s in range(20)) and len(sampler.calls) == 20


def test_gkd_coin_is_seeded_the_same_on_every_rank_and_has_the_right_rate():
    def coins(rank, count=2000):
        sd, _ = student_data(on_policy_fraction=0.3, rank=rank)
        out = []
        for counter in range(count):
            sd.counter = counter
            out.append(sd.choose(step=0)[0])
        return out

    rank0, rank1 = coins(0), coins(1)
    assert rank0 == rank1  # a rank sampling alone would deadlock ZeRO-3 gathers
    assert abs(rank0.count(FRESH) / len(rank0) - 0.3) < 0.035
    sd, sampler = student_data(on_policy_fraction=0.3)
    sources = [sd.prepare(sft_batch(), s)[1] for s in range(8)]
    assert sources == rank0[:8] and len(sampler.calls) == sources.count(FRESH)
    assert sd.log_values() == {"train/student_data_fraction": sources.count(FRESH) / 8}
    assert sd.counts == {FIXED: 0, FRESH: 0, REPLAY: 0}  # the window restarts after logging


# ------------------------------------------------------------------------------------------ DistiLLM schedule + buffer
def test_adaptive_schedule_raises_on_dev_loss_rises_relative_to_the_last_raise():
    s = AdaptiveSchedule(init=0.0, step=0.1, loss_eps=0.1, replay_ratio="decreasing")
    for loss, expected in [(2.0, 0.0), (2.05, 0.0), (2.1, 0.1), (2.15, 0.1), (2.19, 0.1), (2.2, 0.2), (1.0, 0.2)]:
        s.observe(loss)
        assert s.threshold == pytest.approx(expected), loss
    assert s.reference_loss == 2.2  # only a raise moves the reference (DistiLLM's prev_avg_loss)
    for _ in range(20):
        s.observe(s.reference_loss + 1.0)
    assert s.threshold == 1.0  # capped


def test_adaptive_schedule_choice_rule_and_replay_ratios():
    s = AdaptiveSchedule(init=0.6, step=0.1, loss_eps=0.1, replay_ratio="decreasing")
    assert s.fresh_share(0, 10) == pytest.approx(0.6) and s.fresh_share(5, 10) == pytest.approx(0.3)
    assert s.fresh_share(10, 10) == 0.0
    # step 5 of 10: s = 0.3; threshold 0.6
    assert s.choose(0.29, 5, 10, buffer_full=True) == FRESH
    assert s.choose(0.31, 5, 10, buffer_full=True) == REPLAY
    assert s.choose(0.31, 5, 10, buffer_full=False) == FRESH  # the buffer fills up first
    assert s.choose(0.61, 5, 10, buffer_full=False) == FIXED
    s.replay_ratio = "constant"
    assert s.fresh_share(9, 10) == pytest.approx(0.3)
    s.replay_ratio = "increasing"
    assert s.fresh_share(2, 10) == pytest.approx(0.12)


def test_replay_buffer_is_fifo_and_samples_distinct_items():
    buf = ReplayBuffer(3)
    buf.push([{"input_ids": torch.tensor([i])} for i in range(5)])
    assert [int(it["input_ids"]) for it in buf.items] == [2, 3, 4] and buf.full
    got = buf.sample(3, torch.Generator().manual_seed(0))
    assert sorted(int(it["input_ids"]) for it in got) == [2, 3, 4]
    with pytest.raises(ValueError, match="fewer than"):
        buf.sample(4, torch.Generator())
    other = ReplayBuffer(3)
    other.load_state_dict(buf.state_dict())
    assert [int(it["input_ids"]) for it in other.items] == [2, 3, 4]
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(4).load_state_dict(buf.state_dict())


def test_student_data_state_round_trip_continues_bitwise():
    kd = dict(adaptive_off_policy=True, adaptive_init=0.7, adaptive_step=0.1, adaptive_loss_eps=0.0,
              replay_capacity=4)

    def run(sd, steps, observe_at=(3,)):
        outs = []
        for step in steps:
            out, source = sd.prepare(sft_batch(), step)
            outs.append((source, {k: v.clone() for k, v in out.items()}))
            if step in observe_at:
                sd.observe_dev_loss(5.0 - 0.01 * step if step != 6 else 9.0)
        return outs

    full, _ = student_data(total=12, **kd)
    reference = run(full, range(12), observe_at=(3, 6, 9))
    sources = [s for s, _ in reference]
    assert FRESH in sources and REPLAY in sources and FIXED in sources, sources

    first, _ = student_data(total=12, **kd)
    part = run(first, range(7), observe_at=(3, 6))
    state = first.state_dict()
    torch.save(state, "/dev/null")  # the checkpoint format: plain tensors and numbers
    second, _ = student_data(total=12, **kd)
    second.load_state_dict(state)
    part += run(second, range(7, 12), observe_at=(9,))
    assert [s for s, _ in part] == sources
    for (_, a), (_, b) in zip(reference, part):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second.schedule.state_dict() == full.schedule.state_dict()
    assert second.schedule.threshold > 0.7  # the rise at step 6 raised it


# ------------------------------------------------------------------------------------------ MiniLLM alternatives helpers
def test_ranking_pairs_stay_together():
    batch = {"input_ids": torch.tensor([[1, 2], [3, 4]]), "attention_mask": torch.ones(2, 2, dtype=torch.long),
             "index": torch.tensor([7, 9]), "references": [["a"], ["b"]]}
    dup = duplicate_prompts(batch)
    assert dup["input_ids"].tolist() == [[1, 2], [1, 2], [3, 4], [3, 4]]
    assert dup["index"].tolist() == [7, 7, 9, 9] and dup["references"] == [["a"], ["a"], ["b"], ["b"]]
    perm = pair_permutation(10, torch.Generator().manual_seed(3))
    assert sorted(perm.tolist()) == list(range(10))
    assert all(perm[i] % 2 == 0 and perm[i + 1] == perm[i] + 1 for i in range(0, 10, 2))


# ------------------------------------------------------------------------------------------ config checks
@pytest.mark.parametrize("config, overrides, message", [
    ("tiny/sft.yaml", ["kd.on_policy_fraction=0.5"], "methods kd and seqkd"),
    ("tiny/kd.yaml", ["kd.on_policy_fraction=1.5"], r"kd.on_policy_fraction.*\[0, 1\]"),
    ("tiny/gkd.yaml", ["kd.adaptive_off_policy=true"], "pick one"),
    ("tiny/distillm.yaml", ["train.eval_interval=0"], "never evaluates"),
    ("tiny/distillm.yaml", ["kd.replay_capacity=2"], "smaller than one micro-batch"),
    ("tiny/kd.yaml", ["kd.student_max_new_tokens=500"], "student_max_new_tokens"),
    ("tiny/minillm.yaml", ["minillm.long_range=false", "minillm.single_step=false"], "no term left"),
    ("tiny/minillm-ranking.yaml", ["train.micro_batch_size=3", "train.global_batch_size=6",
                                   "rollout.num_rollouts=24"], "must be even"),
])
def test_config_cross_field_checks(config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(REPO / "configs" / config), overrides, world_size=1)


def test_student_max_new_tokens_is_derived():
    cfg = load_config(str(REPO / "configs/tiny/kd.yaml"), world_size=1)
    assert cfg.kd.student_max_new_tokens == cfg.data.max_length - cfg.data.max_prompt_length


# ------------------------------------------------------------------------------------------ end to end
def run_cli(module, *args, timeout=600):
    # one intra-op thread: the tiny models only lose time to more
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-m", module, *args], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-5000:]}"
    return out


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_kd_stop_and_resume_equals_uninterrupted(tmp_path):
    """DistiLLM (fresh student samples, replay buffer, adaptive schedule) stopped after step 2 of 4 and resumed
    gives bitwise the weights and metrics of the uninterrupted run."""
    from safetensors.torch import load_file

    common = ["--config", "configs/tiny/distillm.yaml", "train.max_steps=4", "train.save_interval=2",
              "train.eval_interval=2", "train.eval_at_start=false", "train.micro_batch_size=2",
              "train.global_batch_size=4", "kd.adaptive_init=0.8", "kd.replay_capacity=4",
              "kd.student_max_new_tokens=8", "data.max_dev_records=4", "eval.num_prompts=2", "eval.max_new_tokens=8",
              "logging.log_interval=1"]
    full, parted = tmp_path / "full", tmp_path / "parted"
    # the uninterrupted and the stopped run in this process (a console-script process costs ~5-10 s of imports),
    # with one intra-op thread (one_thread) like the CLI's OMP_NUM_THREADS=1, so both compute bitwise alike
    from minillm.cli.train import run

    assert run(load_config(common[1], [*common[2:], f"output_dir={full}"])) == 0
    assert run(load_config(common[1], [*common[2:], f"output_dir={parted}", "train.stop_at_step=2"])) == 0
    assert (parted / "checkpoints/step-2/student-data-rank0.pt").is_file() and not (parted / "final").exists()
    # the resume in a new process: only the checkpoint (replay buffer, sampler counter, RNG states) carries state
    run_cli("minillm.cli.train", *common, f"output_dir={parted}", "--resume")
    a, b = load_file(str(full / "final/model.safetensors")), load_file(str(parted / "final/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/") and "per_s" not in k}
                          for r in rows]
    assert strip(metrics(full)) == strip(metrics(parted))
    train = [r for r in metrics(full) if "train/loss" in r]
    assert sum(r["train/student_data_fraction"] + r["train/replay_fraction"] for r in train) > 0
    assert train[-1]["train/replay_buffer_size"] == 4.0
    state = torch.load(full / "checkpoints/step-4/student-data-rank0.pt", weights_only=True)
    assert state["counter"] == 8 and len(state["buffer"]["items"]) == 4


TINY_OVERRIDES = ["train.max_steps=2", "train.eval_interval=2", "train.save_interval=0", "train.eval_at_start=false",
                  "train.micro_batch_size=2", "train.global_batch_size=4", "rollout.num_rollouts=4",
                  "rollout.chunk_size=4", "rollout.max_new_tokens=8", "minillm.ppo_epochs=1",
                  "kd.student_max_new_tokens=8", "data.max_dev_records=4", "eval.num_prompts=2",
                  "eval.max_new_tokens=8", "logging.log_interval=1"]
METHODS = ["sft", "kd", "kd-rkl", "seqkd", "gkd", "distillm", "minillm", "minillm-single-step", "minillm-ranking"]


def test_compare_trains_and_evaluates_every_method_on_the_tiny_assets(tmp_path):
    # minillm-compare's main in this process (it trains in-process too): a console-script process would only add
    # ~5-10 s of imports
    from minillm.cli.compare import main as compare_main

    out = tmp_path / "compare"
    assert compare_main(["--pair", "tiny", "--methods", *METHODS, "--data", "tests/assets/data/dev.jsonl",
                         "--num", "4", "--max-new-tokens", "8", "--out", str(out), "--no-progress", "--train-override",
                         *TINY_OVERRIDES, "seed=10"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in result["methods"]] == METHODS and result["sets"] == ["dev"]
    for row in result["methods"]:
        assert row["train"]["steps"] == 2
        assert 0.0 <= row["eval"]["dev"]["mean"]["rougeL"] <= 100.0, row
        assert row["seed"] == 10 and "seed=10" in row["overrides"]
    table = (out / "compare.md").read_text()
    assert table.count("\n") == 2 + len(METHODS) and all(f"| {m} |" in table for m in METHODS)
    runs = {m: metrics(out / "runs" / m) for m in METHODS}
    configs = {m: __import__("yaml").safe_load((out / "runs" / m / "config.yaml").read_text()) for m in METHODS}
    assert configs["kd-rkl"]["kd"]["divergence"] == "rkl" and configs["kd"]["kd"]["divergence"] == "fkl"
    train = {m: [r for r in rows if "train/loss" in r] for m, rows in runs.items()}
    # GKD: half the micro-batches (seeded coin) are the student's own samples, the loss is the pure JSD term
    assert all("train/student_data_fraction" in r for r in train["gkd"])
    assert all(r["train/loss"] == pytest.approx(r["train/kd"], rel=1e-6) for r in train["gkd"])
    assert all("train/off_policy_threshold" in r for r in train["distillm"])
    # single-step only: the long-range term is logged but not in the loss
    for r in train["minillm-single-step"]:
        assert "train/pg_loss" in r
        assert r["train/loss"] == pytest.approx(r["train/single_step_kl"] + r["train/pt_loss"], rel=1e-5)
    for r in train["minillm"]:
        assert r["train/loss"] == pytest.approx(r["train/pg_loss"] + r["train/single_step_kl"] + r["train/pt_loss"],
                                                rel=1e-5)
    # ranking: J (+ PT) and no policy-gradient term at all
    for r in train["minillm-ranking"]:
        assert "train/pg_loss" not in r and 0.0 <= r["train/ranking_agreement"] <= 1.0
        assert r["train/loss"] == pytest.approx(r["train/ranking_loss"] + r["train/pt_loss"], rel=1e-5)
        assert r["train/ranking_hinge"] >= 0.0
