"""The offline teacher cache of the pre-training corpus (DESIGN §7): top-k storage, dense read-back, and the
MiniLLM PT loss reading it instead of running the teacher (exact when k = V)."""

import json
import math

import pytest
import torch

from minillm import losses
from minillm.data.teacher_cache import TeacherTopKCache, build_teacher_topk_cache, expand_topk
from minillm.data.records import DataError

from conftest import ASSETS

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny-model calls: see conftest.py


def test_expand_topk_keeps_the_top_entries_and_spreads_the_tail():
    logp = torch.log_softmax(torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0]]), -1)  # V = 5
    values, ids = logp.topk(2, -1)
    dense = expand_topk(ids, values, 5)
    torch.testing.assert_close(dense[0, ids[0]], values[0])  # kept entries as stored
    tail = 1.0 - values.exp().sum()
    for v in set(range(5)) - set(ids[0].tolist()):
        assert dense[0, v].item() == pytest.approx(math.log(float(tail) / 3), rel=1e-6)  # the tail, evenly
    assert torch.logsumexp(dense, -1).item() == pytest.approx(0.0, abs=1e-6)
    exact = expand_topk(*reversed(logp.topk(5, -1)), 5)  # k = V: the distribution itself
    torch.testing.assert_close(exact, logp)
    with pytest.raises(ValueError, match="exceeds"):
        expand_topk(torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 6), 5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from transformers import AutoTokenizer

    from minillm.data import pack_corpus
    from minillm.data.pretrain import PackedCorpus

    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    out = tmp_path_factory.mktemp("corpus") / "packed"
    pack_corpus(str(ASSETS / "data" / "pretrain.txt"), tok, out, seq_length=32)
    return PackedCorpus(out)


@pytest.fixture(scope="module")
def teacher():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ASSETS / "teacher").eval()


def test_full_vocabulary_cache_gives_the_online_pt_loss(corpus, teacher, tmp_path):
    path = build_teacher_topk_cache(corpus, teacher, tmp_path / "cache", top_k=512, storage="fp32", batch_size=3)
    cache = TeacherTopKCache(path)
    cache.check(corpus, 512)
    assert len(cache) == len(corpus) and not (tmp_path / ".tmp-cache").exists()
    rows = [0, 5, len(corpus) - 1]
    batch = torch.stack([corpus[i]["input_ids"] for i in rows])
    labels = torch.stack([corpus[i]["labels"] for i in rows])
    with torch.no_grad():
        t_logits = teacher(input_ids=batch).logits
    student_logits = torch.randn(*labels.shape, 512, generator=torch.Generator().manual_seed(0))
    online = losses.pt_loss(student_logits, labels, t_logits, kd_ratio=0.5)
    cached = losses.pt_loss(student_logits, labels, cache.dense(rows), kd_ratio=0.5)
    assert cached.item() == pytest.approx(online.item(), rel=1e-5)

    # top-8 in fp32: the KD term is −Σ_top8 p log q − p_tail · mean over the other 504 entries of log q
    top = build_teacher_topk_cache(corpus, teacher, tmp_path / "top8", top_k=8, storage="fp32")
    approx = losses.pt_loss(student_logits, labels, TeacherTopKCache(top).dense(rows), kd_ratio=1.0)
    log_p, log_q = torch.log_softmax(t_logits.double(), -1), torch.log_softmax(student_logits.double(), -1)
    p_top, ids = log_p.exp().topk(8, -1)
    rest = torch.ones_like(log_q, dtype=torch.bool).scatter_(-1, ids, False)
    tail_mean = (log_q * rest).sum(-1) / 504
    want = -(p_top * log_q.gather(-1, ids)).sum(-1) - (1 - p_top.sum(-1)) * tail_mean
    assert approx.item() == pytest.approx(want.mean().item(), rel=1e-5)
    with pytest.raises(DataError, match="vocab_size=512, but the run has 500"):
        TeacherTopKCache(top).check(corpus, 500)


def test_trainer_pt_loss_reads_the_cache_instead_of_running_the_teacher(tmp_path):
    """MiniLLMTrainer with minillm.pt_teacher_cache: micro_batch_loss's PT loss (chunked and plain paths) equals
    the online one for a k = V cache, and the cached trainer's teacher never runs."""
    from minillm.config import load_config
    from minillm.data import build_instruction_data, load_or_pack_corpus
    from minillm.models import check_compatibility, load_model, load_tokenizer
    from minillm.strategy import build_strategy
    from minillm.trainers.minillm import MiniLLMTrainer

    # single_step off: only the PT loss could need the teacher in a learn micro-step
    cfg = load_config("configs/tiny/minillm.yaml", [f"output_dir={tmp_path / 'run'}", "minillm.loss_chunk_size=40",
                                                    "rollout.num_rollouts=16", "train.global_batch_size=8",
                                                    "minillm.single_step=false", f"data.cache_dir={tmp_path}"])
    tokenizer = load_tokenizer(cfg.student)
    corpus = load_or_pack_corpus(cfg.data, tokenizer)
    build_teacher_topk_cache(corpus, load_model(cfg.teacher, trainable=False), tmp_path / "cache", top_k=512,
                             storage="fp32")

    def build(cache):
        cfg.minillm.pt_teacher_cache = cache  # read once, when the trainer is built
        data = build_instruction_data(cfg.data, tokenizer, seed=cfg.seed)
        student, teacher = load_model(cfg.student, trainable=True), load_model(cfg.teacher, trainable=False)
        return MiniLLMTrainer(cfg, student, tokenizer, data, build_strategy(cfg).setup(), teacher=teacher,
                              alignment=check_compatibility(student, teacher, tokenizer))

    online, cached = build(None), build(str(tmp_path / "cache"))
    assert online.pt_cache is None and cached.pt_cache is not None
    mb = online.rollout_and_score().select(torch.arange(8))
    pt_batch = online._next_pt_batch()
    assert pt_batch["index"].shape == (8,)
    for trainer in (online, cached):
        trainer._next_pt_batch = lambda: pt_batch
    calls = []
    cached.teacher.register_forward_pre_hook(lambda module, args: calls.append(1))
    for chunked in (True, False):
        cfg.minillm.chunked_losses = chunked
        a = online.micro_batch_loss(mb)[1]["pt_loss"]
        b = cached.micro_batch_loss(mb)[1]["pt_loss"]
        assert b == pytest.approx(a, rel=1e-5), chunked
    assert calls == []
    with pytest.raises(DataError, match="not a teacher top-k cache"):
        build(str(tmp_path / "nowhere"))


def test_cli_writes_the_cache_and_fails_clearly(corpus, tmp_path, capsys):
    from minillm.cli.teacher_cache import main

    out = tmp_path / "cli-cache"
    assert main(["--corpus", str(corpus.path), "--teacher", str(ASSETS / "teacher"), "--top-k", "4", "--out", str(out),
                 "--no-progress"]) == 0
    meta = json.loads((out / "teacher_topk.json").read_text())
    assert (meta["top_k"], meta["num_chunks"], meta["seq_length"], meta["vocab_size"]) == (4, len(corpus), 32, 512)
    assert main(["--corpus", str(tmp_path / "missing"), "--teacher", str(ASSETS / "teacher"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "not a packed corpus" in capsys.readouterr().err


def test_a_cache_of_the_same_shape_from_another_corpus_is_refused(corpus, teacher, tmp_path):
    """Shapes alone cannot tell corpora apart: the token fingerprint does. Another teacher path is warned about."""
    import shutil

    from minillm.data.pretrain import PackedCorpus

    path = build_teacher_topk_cache(corpus, teacher, tmp_path / "cache", top_k=4, teacher_name="teachers/a")
    cache = TeacherTopKCache(path)
    assert cache.check(corpus, 512, teacher_path="teachers/a") == []
    warnings = cache.check(corpus, 512, teacher_path="teachers/b")
    assert len(warnings) == 1 and "teachers/a" in warnings[0] and "teachers/b" in warnings[0]
    # the same corpus with one token changed: same number of chunks, same length, same vocabulary
    other = tmp_path / "other-corpus"
    shutil.copytree(corpus.path, other)
    tokens = (other / "tokens.bin").read_bytes()
    (other / "tokens.bin").write_bytes(bytes([tokens[0] ^ 1]) + tokens[1:])
    changed = PackedCorpus(other)
    assert (len(changed), changed.seq_length) == (len(corpus), corpus.seq_length)
    with pytest.raises(DataError, match="other tokens"):
        cache.check(changed, 512)
    # a cache without a fingerprint (older minillm) is refused rather than trusted
    meta = json.loads((path / "teacher_topk.json").read_text())
    del meta["fingerprint"]
    (path / "teacher_topk.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="no corpus fingerprint"):
        TeacherTopKCache(path).check(corpus, 512)
