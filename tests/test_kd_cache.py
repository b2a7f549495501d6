"""kd.teacher_cache: the teacher's top-k distributions on a kd/seqkd training set, computed once.

Oracles: each stored row is the teacher's top-k at that example's loss position (checked against a fresh teacher
forward); with k = V in fp32 a KD run reading the cache trains the same student as the online teacher, on the
chunked and the plain loss path, while the teacher's weights are never even loaded; a cache of other data, of
another kind or for another setup fails with a message that says what to rebuild.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO
from minillm.config import ConfigError, load_config
from minillm.data.kd_cache import ResponseTopKCache, build_response_topk_cache
from minillm.data.records import DataError

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny-model calls: see conftest.py

RUN = ["train.max_steps=6", "train.eval_interval=0", "train.save_interval=0", "logging.log_interval=1"]


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory):
    """A k = V (512) fp32 cache of configs/tiny/kd.yaml's training set, through the CLI."""
    from minillm.cli.teacher_cache import main

    out = tmp_path_factory.mktemp("kd-cache") / "top512"
    assert main(["--config", "configs/tiny/kd.yaml", "--top-k", "512", "--storage", "fp32", "--out", str(out),
                 "--batch-size", "7", "--no-progress"]) == 0
    return out


def build(tmp_path, *overrides):
    from minillm.cli.train import build_trainer
    from minillm.strategy import build_strategy

    cfg = load_config("configs/tiny/kd.yaml", [f"output_dir={tmp_path}", *RUN, *overrides], world_size=1)
    return build_trainer(cfg, build_strategy(cfg).setup())


def train_both_and_compare_kd(online, cached, tmp_path) -> list[dict]:
    """Train both runs (output dirs tmp_path/online and tmp_path/cached); their per-step KD terms must agree.
    Returns the cached run's logged rows."""
    online.train()
    cached.train()
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("online", "cached")}
    kd = {name: [r["train/kd"] for r in rows[name] if "train/kd" in r] for name in rows}
    assert len(kd["online"]) == 6 and kd["cached"] == pytest.approx(kd["online"], rel=1e-5)
    return rows["cached"]


def test_rows_are_the_teachers_top_k_at_each_loss_position(tmp_path):
    from minillm.data import build_instruction_data
    from minillm.models import load_model, load_tokenizer

    cfg = load_config("configs/tiny/kd.yaml")
    tokenizer = load_tokenizer(cfg.student)
    train = build_instruction_data(cfg.data, tokenizer, seed=cfg.seed).train
    teacher = load_model(cfg.teacher, trainable=False)
    path = build_response_topk_cache(train, teacher, tmp_path / "top5", top_k=5, pad_token_id=1, batch_size=4,
                                     storage="fp32")
    cache = ResponseTopKCache(path)
    assert len(cache) == len(train) and cache.meta["num_positions"] == train.num_response_tokens()
    for index in (0, 17, len(train) - 1):
        item = train[index]
        with torch.no_grad():
            logp = torch.log_softmax(teacher(input_ids=item["input_ids"][None]).logits[0].float(), -1)
        values, ids = logp[item["labels"] != -100].topk(5, -1)
        lo, hi = cache.offsets[index], cache.offsets[index + 1]
        assert torch.equal(torch.from_numpy(cache.ids[lo:hi].copy()).long(), ids)
        torch.testing.assert_close(torch.from_numpy(cache.logprobs[lo:hi].copy()), values)
    # read back for a right-padded micro-batch: each row's cached rows land on its own loss positions
    batch = [train[i] for i in (3, 0)]
    labels = torch.full((2, max(len(it["labels"]) for it in batch)), -100)
    for row, it in enumerate(batch):
        labels[row, :len(it["labels"])] = it["labels"]
    topk = cache.topk(torch.tensor([3, 0]), labels)
    assert topk.shape == (2, labels.shape[1], 512)
    first = (labels[1] != -100).nonzero()[0, 0]
    assert torch.equal(topk.ids[1, first].long(), torch.from_numpy(cache.ids[cache.offsets[0]].copy()).long())
    with pytest.raises(DataError, match="loss positions"):
        cache.topk(torch.tensor([0, 3]), labels)  # rows swapped: the counts no longer fit


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "plain"])
def test_full_vocabulary_cache_trains_like_the_online_teacher(full_cache, tmp_path, chunked, monkeypatch):
    online = build(tmp_path / "online", f"kd.chunked={str(chunked).lower()}")
    import minillm.models

    loaded = []
    real_load = minillm.models.load_model
    monkeypatch.setattr(minillm.models, "load_model", lambda cfg, **kw: loaded.append(cfg.path) or real_load(cfg, **kw))
    cached = build(tmp_path / "cached", f"kd.chunked={str(chunked).lower()}", f"kd.teacher_cache={full_cache}")
    assert loaded == ["tests/assets/student"]  # the teacher's weights were never read
    assert cached.teacher is None and online.teacher is not None
    train_both_and_compare_kd(online, cached, tmp_path)
    for (name, a), b in zip(online.student.state_dict().items(), cached.student.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)


def test_mismatches_fail_with_what_to_rebuild(full_cache, tmp_path):
    with pytest.raises(DataError, match="training set differs"):  # another prompt template: other token ids
        build(tmp_path / "a", f"kd.teacher_cache={full_cache}", "data.template=raw")
    with pytest.raises(DataError, match="training examples"):
        build(tmp_path / "b", f"kd.teacher_cache={full_cache}", "data.max_train_records=100")
    pt_like = tmp_path / "pt"
    pt_like.mkdir()
    (pt_like / "teacher_topk.json").write_text(json.dumps({"format": "minillm-teacher-topk-v1"}))
    with pytest.raises(DataError, match="minillm.pt_teacher_cache"):
        ResponseTopKCache(pt_like)


@pytest.mark.parametrize("overrides, message", [
    (["method=sft"], "methods kd and seqkd"),
    (["kd.kd_ratio=0"], "kd_ratio > 0"),
])
def test_config_refuses_a_cache_it_cannot_use(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny/kd.yaml", ["kd.teacher_cache=somewhere", *overrides])


def test_cli_refuses_other_methods_and_stray_overrides(tmp_path, capsys):
    from minillm.cli.teacher_cache import main

    assert main(["--config", "configs/tiny/minillm.yaml", "--out", str(tmp_path / "x")]) == 2
    assert "serves methods kd and seqkd" in capsys.readouterr().err
    assert main(["--corpus", "x", "--teacher", "y", "--out", str(tmp_path / "y"), "train.max_steps=1"]) == 2
    assert "need --config" in capsys.readouterr().err


def test_a_cache_from_another_teacher_path_is_flagged(full_cache, tmp_path, caplog, monkeypatch):
    import logging
    import shutil

    monkeypatch.setattr(logging.getLogger("minillm"), "propagate", True)  # minillm-train's setup turns it off
    caplog.set_level(logging.WARNING)
    shutil.copytree(REPO / "tests/assets/teacher", tmp_path / "teacher-copy", dirs_exist_ok=True)
    build(tmp_path / "run", f"kd.teacher_cache={full_cache}", f"teacher.path={tmp_path / 'teacher-copy'}")
    assert "was built from teacher tests/assets/teacher" in caplog.text


def test_gkd_reads_the_cache_on_fixed_batches_and_runs_the_teacher_on_student_samples(full_cache, tmp_path):
    """kd.on_policy_fraction = 0.5 (GKD): fixed-data micro-batches read the cache, the student's samples (which
    carry no dataset index) go to the online teacher; with k = V the run is the online one."""
    online = build(tmp_path / "online", "kd.on_policy_fraction=0.5")
    cached = build(tmp_path / "cached", "kd.on_policy_fraction=0.5", f"kd.teacher_cache={full_cache}")
    assert cached.teacher is not None and cached.teacher_cache is not None
    calls = []
    cached.teacher.get_input_embeddings().register_forward_hook(lambda *args: calls.append(1))
    rows = train_both_and_compare_kd(online, cached, tmp_path)
    # 2 micro-batches per step (global 8 / micro 4): the teacher ran once per student-sampled micro-batch
    sampled = round(sum(2 * r["train/student_data_fraction"] for r in rows if "train/kd" in r))
    assert 0 < sampled < 12 and len(calls) == sampled
