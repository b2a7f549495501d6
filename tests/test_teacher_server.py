"""minillm-teacher-serve and teacher.server (issue 22), with the servers as real subprocesses on 127.0.0.1.

A served teacher gives the colocated teacher's hidden states, so losses, gradients and whole kd runs are the same
(fp32 on CPU); the token, the request limits and malformed bodies are refused; a server with another tokenizer fails
the pre-flight check; a server killed mid-run leads to retries, a checkpoint of the exact position and exit 75;
two servers behind one client share the batches."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minillm.cli.train import run
from minillm.config import ModelConfig, load_config
from minillm.serve import protocol
from minillm.serve.client import TeacherClient, TeacherServerError, TeacherServerUnavailable
from minillm.trainers.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
TEACHER = "tests/assets/teacher"
TOKEN = "t22-secret-token-value"
KD = ["train.max_steps=4", "train.save_interval=2", "train.eval_interval=0", "logging.log_interval=1",
      "data.max_length=160", "train.select_best_by=none", "eval.rouge=false", "train.eval_at_start=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``python -m minillm.cli.teacher_serve`` process (one torch thread: the box is shared)."""

    def __init__(self, log: Path, model: str | Path = TEACHER, token: str | None = TOKEN, *extra: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env.pop(protocol.TOKEN_ENV, None)
        if token:
            env[protocol.TOKEN_ENV] = token
        self.proc = subprocess.Popen([sys.executable, "-m", "minillm.cli.teacher_serve", "--model", str(model),
                                      "--port", str(self.port), *extra], cwd=REPO, env=env,
                                     stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 90.0) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"the server did not start:\n{self.log.read_text()}")

    def info(self) -> dict:
        return TeacherClient(self.url, token=TOKEN, retries=0).info(self.url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """Three servers, started together: ``a`` and ``b`` serve the teacher (``b`` is killed by the last test),
    ``other`` the teacher with a tokenizer whose EOS differs (same weights), with a small batch limit for the 413
    case. The colocated reference run trains while they start."""
    from transformers import AutoTokenizer
    import shutil

    tmp = tmp_path_factory.mktemp("servers")
    other = tmp / "other-teacher"
    shutil.copytree(REPO / TEACHER, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.eos_token = tok.convert_ids_to_tokens(5)
    tok.save_pretrained(other)
    started = {"a": Server(tmp / "a.log"), "b": Server(tmp / "b.log"),
               "other": Server(tmp / "other.log", other, TOKEN, "--max-batch-tokens", "64")}
    try:
        out = tmp / "colocated"
        assert run(_config(out)) == 0
        yield {name: server.wait() for name, server in started.items()}, out
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def servers(started):
    return started[0]


@pytest.fixture(scope="module")
def colocated(started):
    """The kd run with the teacher loaded locally: the reference of the served runs."""
    return started[1]


def _config(out, *extra):
    return load_config("configs/tiny/kd.yaml", [*KD, f"output_dir={out}", *extra])


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _losses(rows):
    return [{k: v for k, v in row.items() if k.startswith("train/") and "per_s" not in k} for row in rows]


def test_kd_with_two_servers_logs_the_colocated_losses_and_both_servers_work(servers, colocated, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv(protocol.TOKEN_ENV, TOKEN)
    before = {name: servers[name].info()["scored_batches"] for name in ("a", "b")}
    out = tmp_path / "served"
    assert run(_config(out, f"teacher.server={servers['a'].url},{servers['b'].url}")) == 0
    served, reference = _rows(out), _rows(colocated)
    assert [r["step"] for r in served] == [r["step"] for r in reference] == [1, 2, 3, 4]
    for mine, theirs in zip(_losses(served), _losses(reference)):
        assert mine.keys() == theirs.keys() and "train/kd" in mine
        for key in mine:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-7), key
    # 4 steps x 2 micro-batches, each scored once (prefetched or not), round-robin over the two servers, +1
    # identity probe each
    after = {name: servers[name].info()["scored_batches"] for name in ("a", "b")}
    assert {name: after[name] - before[name] for name in after} == {"a": 5, "b": 5}
    for row in served:  # the server time and how much of it the student's forward hid
        assert row["time/teacher_request"] > 0 and 0.0 <= row["teacher/hidden_fraction"] <= 1.0
    # each step's second micro-batch was prefetched while the first learned: that wait is close to nothing
    assert max(row["teacher/hidden_fraction"] for row in served) > 0.1
    from safetensors.torch import load_file

    mine, theirs = (load_file(str(Path(d) / "final" / "model.safetensors")) for d in (out, colocated))
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6)


def test_requests_without_the_token_are_refused_and_bad_requests_are_named(servers, monkeypatch):
    monkeypatch.delenv(protocol.TOKEN_ENV, raising=False)
    url = servers["a"].url
    body = protocol.encode({"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3).long()})

    def post(path, data, headers):
        conn = http.client.HTTPConnection("127.0.0.1", servers["a"].port, timeout=10)
        conn.request("POST" if data is not None else "GET", path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        assert post("/v1/score", body, headers)[0] == 401
        assert post("/v1/info", None, headers)[0] == 401
    status, payload = post("/v1/score", body, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and protocol.decode(payload)[0]["hidden"].shape == (1, 3, 64)
    with pytest.raises(TeacherServerError, match=protocol.TOKEN_ENV):
        TeacherClient(url, retries=0).info(url)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, payload = post("/v1/score", b"not a safetensors body", auth)
    assert status == 400 and "safetensors" in json.loads(payload)["error"]
    no_mask = protocol.encode({"input_ids": torch.tensor([[1, 2]])})
    assert json.loads(post("/v1/score", no_mask, auth)[1])["error"] == "the body has no `attention_mask` tensor"
    status, payload = post("/v1/score?outputs=logits", body, auth)
    assert status == 400 and "outputs='logits'" in json.loads(payload)["error"]
    big = protocol.encode({"input_ids": torch.zeros(4, 32).long(), "attention_mask": torch.ones(4, 32).long()})
    other = servers["other"]
    conn = http.client.HTTPConnection("127.0.0.1", other.port, timeout=10)
    conn.request("POST", "/v1/score", body=big, headers=auth)
    response = conn.getresponse()
    assert response.status == 413 and "--max-batch-tokens=64" in json.loads(response.read())["error"]
    conn = http.client.HTTPConnection("127.0.0.1", other.port, timeout=10)  # no content-length: counted on reading
    conn.putrequest("POST", "/v1/score")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for _ in range(20):  # 80 KiB: past the 64 x 24 bytes + 64 KiB header allowance
        conn.send(b"1000\r\n" + b"x" * 4096 + b"\r\n")
    conn.send(b"0\r\n\r\n")
    response = conn.getresponse()
    assert response.status == 413 and "exceeds" in json.loads(response.read())["error"]
    for server in servers.values():  # the token never reaches the server's output
        assert TOKEN not in server.log.read_text()


def test_served_outputs_match_the_colocated_model(servers, monkeypatch):
    """Hidden states bitwise, sampled-token and top-k log-probs at a temperature; the chunked KD loss and its
    student gradients through RemoteTeacher equal the colocated teacher's (fp32)."""
    from minillm.losses import chunked as chunked_losses
    from minillm.losses.heads import hidden_and_head
    from minillm.models import load_model
    from minillm.serve.remote import RemoteTeacher

    monkeypatch.setenv(protocol.TOKEN_ENV, TOKEN)
    teacher = load_model(ModelConfig(path=TEACHER), trainable=False)
    student = load_model(ModelConfig(path="tests/assets/student"), trainable=True)
    remote = RemoteTeacher.from_config(ModelConfig(path=TEACHER, server=servers["a"].url))
    assert sum(p.numel() for p in remote.parameters()) == teacher.get_output_embeddings().weight.numel()
    ids = torch.randint(2, 500, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = remote.client.score({"input_ids": ids, "attention_mask": mask, "position_ids": positions},
                              {"outputs": "hidden,token_logprobs,topk", "temperature": "2.0", "top_k": "5"})
    with torch.no_grad():
        hidden, head = hidden_and_head(teacher, ids, mask, positions)
        logp = torch.log_softmax(head(hidden).float() / 2.0, -1)
    assert torch.equal(out["hidden"], hidden)
    torch.testing.assert_close(out["token_logprobs"], logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0])
    torch.testing.assert_close(out["topk_logprobs"], logp.topk(5, -1).values)
    assert torch.equal(out["topk_ids"], logp.topk(5, -1).indices)

    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for model in (teacher, remote):
        student.zero_grad()
        s_hidden, s_head = hidden_and_head(student, ids, mask, positions)
        with torch.no_grad():
            t_hidden, t_head = hidden_and_head(model, ids, mask, positions)
        terms = chunked_losses.chunked_kd_loss(s_hidden, s_head, labels, kd_ratio=0.5, divergence="fkl",
                                               temperature=1.0, chunk_size=8, teacher_hidden=t_hidden,
                                               teacher_head=t_head)
        terms.loss.backward()
        results.append((terms.loss.detach(), [p.grad.clone() for p in student.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    # a prefetched batch (prefetched twice) is taken by the forward with equal inputs: one request, not three
    count = remote.client.requests_per_url[servers["a"].url]
    remote.prefetch(ids, mask, positions)
    remote.prefetch(ids.clone(), mask, positions)
    torch.testing.assert_close(remote(ids, mask, positions).logits, teacher(ids, mask, positions).logits)
    assert remote.client.requests_per_url[servers["a"].url] == count + 1
    remote.close()


def test_preflight_catches_a_server_with_another_tokenizer(servers, monkeypatch):
    from minillm.preflight import ERROR, preflight

    monkeypatch.setenv(protocol.TOKEN_ENV, TOKEN)

    def errors(url):
        cfg = load_config("configs/tiny/kd.yaml", [f"teacher.server={url}"])
        return [f for f in preflight(cfg) if f.severity == ERROR]

    assert errors(servers["a"].url) == []
    found = errors(servers["other"].url)
    assert [f.check for f in found] == ["teacher server"]
    assert servers["other"].url in found[0].message and "another tokenizer" in found[0].message
    monkeypatch.setenv(protocol.TOKEN_ENV, "wrong")
    found = errors(servers["a"].url)
    assert [f.check for f in found] == ["teacher server"] and "(401)" in found[0].message


def test_teacher_server_is_a_yaml_list_or_a_comma_separated_string(tmp_path):
    """Both spellings load to the same list (and survive the run's config.yaml); a bad entry or a value of
    another type fails naming the key (and the entry)."""
    from minillm.config import ConfigError, to_yaml

    urls = ["http://127.0.0.1:8001", "http://teacher-node:8002/prefix"]
    import yaml

    data = yaml.safe_load((REPO / "configs/tiny/kd.yaml").read_text())
    data["teacher"]["server"] = urls  # teacher: {server: [http://..., http://...]} in a YAML file
    listed = tmp_path / "listed.yaml"
    listed.write_text(yaml.safe_dump(data))
    spelled = [load_config(listed), load_config("configs/tiny/kd.yaml", [f"teacher.server={','.join(urls)}"]),
               load_config("configs/tiny/kd.yaml", [f"teacher.server=[{', '.join(urls)}]"]),
               load_config("configs/tiny/kd.yaml", [f"teacher.server={urls[0]}"])]
    for cfg in spelled:
        cfg.resolve()
    assert [c.teacher.server for c in spelled] == [urls, urls, urls, urls[:1]]
    saved = tmp_path / "config.yaml"  # what a run writes and --resume reads back
    saved.write_text(to_yaml(spelled[0]))
    assert load_config(saved).teacher.server == urls
    assert ModelConfig(path=TEACHER, server=" http://a:1 , http://b:2 ").server == ["http://a:1", "http://b:2"]
    with pytest.raises(ConfigError, match=r"`teacher.server\[1\]`: `teacher-node:8002` is not a server URL"):
        load_config("configs/tiny/kd.yaml", [f"teacher.server=[{urls[0]}, teacher-node:8002]"]).resolve()
    with pytest.raises(ConfigError, match=r"`teacher.server` must be list\[str\] or str, got 8001"):
        load_config("configs/tiny/kd.yaml", ["teacher.server=8001"])
    with pytest.raises(ConfigError, match="`teacher.server`: is empty"):
        load_config("configs/tiny/kd.yaml", ["teacher.server=[]"]).resolve()


def test_a_served_teacher_mixes_only_speculatively_and_reports_a_dead_server():
    from minillm.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.teacher_mix_alpha.*needs rollout.engine=speculative"):
        load_config("configs/tiny/minillm.yaml", ["teacher.server=http://127.0.0.1:9"]).resolve()
    speculative = ["teacher.server=http://127.0.0.1:9", "rollout.engine=speculative"]
    assert load_config("configs/tiny/minillm.yaml", speculative).resolve().rollout.teacher_mix_alpha == 0.2
    with pytest.raises(ConfigError, match="rollout.do_sample"):
        load_config("configs/tiny/minillm.yaml", [*speculative, "rollout.do_sample=false"]).resolve()
    with pytest.raises(ConfigError, match="teacher.server"):
        load_config("configs/tiny/kd.yaml", ["teacher.server=127.0.0.1:9"]).resolve()
    client = TeacherClient(f"http://127.0.0.1:{_free_port()}", retries=1, backoff=0.01, timeout=2)
    with pytest.raises(TeacherServerUnavailable, match="no answer after 2 tries"):
        client.score({"input_ids": torch.ones(1, 2).long(), "attention_mask": torch.ones(1, 2).long()}, {})


def test_bench_measures_bytes_per_token_and_served_scoring():
    """minillm-bench --served: the server's real bodies carry 4H / 2H bytes per token of hidden states and 12k of
    top-k (plus the safetensors header), against 4V of full logits; served scoring gives the colocated log-probs."""
    from minillm.bench.served import measure_served
    from minillm.models import load_model

    teacher = load_model(ModelConfig(path=TEACHER), trainable=False)
    ids = torch.randint(2, 500, (2, 24))
    result = measure_served(teacher, ids, top_k=8, repeats=1)
    tokens, header = 48, 256 / 48  # a safetensors header is well under 256 bytes here
    assert result["tokens"] == tokens and (result["hidden_size"], result["vocab_rows"]) == (64, 512)
    measured, payload = result["bytes_per_token"], result["payload_bytes_per_token"]
    assert payload == {"hidden_fp32": 256, "hidden_bf16": 128, "top8": 96, "full_logits_fp32": 2048,
                       "full_logits_bf16": 1024}
    for name in ("hidden_fp32", "hidden_bf16", "top8"):
        assert payload[name] < measured[name] < payload[name] + header
    assert measured["full_logits_fp32"] == 2048 and result["request_bytes_per_token"] < 16 + header
    assert result["max_logprob_difference"] == 0.0
    assert all(v > 0 for v in result["scoring_seconds"].values())


@pytest.mark.parametrize("tied", [True, False])
def test_the_lm_head_alone_is_read_from_sharded_weights_tied_or_not(tmp_path, tied):
    """RemoteTeacher's head: the output embedding of a sharded checkpoint (index + shards), found under the input
    embedding's name when tied (the files hold it once), and nothing else is loaded."""
    from minillm.models import tiny_llama
    from minillm.serve.remote import load_lm_head

    model = tiny_llama(vocab_size=96, hidden_size=16, tie_word_embeddings=tied, seed=3)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    names = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert ("lm_head.weight" in names) != tied
    head, config = load_lm_head(ModelConfig(path=str(tmp_path)))
    assert torch.equal(head.weight, model.get_output_embeddings().weight) and head.bias is None
    assert config.vocab_size == 96 and not head.weight.requires_grad


def test_loopback_hosts_are_recognised():
    from minillm.cli.teacher_serve import _loopback

    assert all(_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.5"))
    assert not any(_loopback(h) for h in ("0.0.0.0", "10.0.0.3", "::", "teacher-node"))


MINILLM = ["train.max_steps=2", "train.save_interval=0", "train.eval_interval=0", "logging.log_interval=1",
           "rollout.max_new_tokens=8", "rollout.num_rollouts=8", "rollout.chunk_size=4", "train.micro_batch_size=4",
           "train.global_batch_size=8", "rollout.teacher_mix_alpha=0", "train.select_best_by=none",
           "eval.rouge=false", "minillm.ppo_epochs=1"]


def test_minillm_with_a_served_teacher_logs_the_colocated_losses(servers, tmp_path, monkeypatch):
    """Rollout scoring, the chunked single-step and PT KD losses read the served hidden states through the local
    head: the logged losses (rewards, KL, PT) equal the colocated run's. Every teacher request was sent ahead
    (each phase's 2 rollout chunks: chunk 1 while chunk 2 was generated; each step's 2 PT batches: while the policy
    terms and the previous micro-batch learned), and each exactly once."""
    monkeypatch.setenv(protocol.TOKEN_ENV, TOKEN)
    before = servers["a"].info()["scored_batches"]
    outs = {}
    for name, extra in (("colocated", []), ("served", [f"teacher.server={servers['a'].url}"])):
        outs[name] = tmp_path / name
        cfg = load_config("configs/tiny/minillm.yaml", [*MINILLM, f"output_dir={outs[name]}", *extra])
        assert run(cfg) == 0
    served, reference = _losses(_rows(outs["served"])), _losses(_rows(outs["colocated"]))
    assert len(served) == len(reference) == 2 and any("pt" in key for key in served[0])
    for mine, theirs in zip(served, reference):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    # 2 phases x (2 rollout chunks + 2 PT batches) + the identity probe + the trainer's chunked-head probe (a plain
    # forward when the trainer starts, so step 1 logs 4 of 5 forwards prefetched): no request twice, none wasted
    assert servers["a"].info()["scored_batches"] - before == 10
    rows = _rows(outs["served"])
    assert [row["teacher/prefetched"] for row in rows] == [0.8, 1.0]
    for row in rows:
        assert row["time/teacher_request"] > 0
        assert 0.0 <= row["teacher/hidden_fraction"] <= 1.0 and row["time/teacher_wait"] >= 0
    assert max(row["teacher/hidden_fraction"] for row in rows) > 0.1  # the server worked while the student did
    assert not any("teacher/" in key for row in _rows(outs["colocated"]) for key in row)


def test_served_speculative_rollouts_equal_the_colocated_ones(servers, monkeypatch):
    """rollout.engine=speculative with α > 0 and a served teacher: each round's verification is one request on the
    full prefix (no remote KV cache); same seeds, same tokens as with the colocated teacher's cached verification,
    the same log-probs to rounding. Left-padded prompts, rejections (holes) and EOS stops included."""
    from minillm.generation.speculative import speculative_mixed_sample
    from minillm.models import load_model
    from minillm.serve.remote import RemoteTeacher

    monkeypatch.setenv(protocol.TOKEN_ENV, TOKEN)
    teacher = load_model(ModelConfig(path=TEACHER), trainable=False)
    student = load_model(ModelConfig(path="tests/assets/student"), trainable=False)
    remote = RemoteTeacher.from_config(ModelConfig(path=TEACHER, server=servers["a"].url))
    ids = torch.randint(2, 500, (4, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = mask[2, :1] = 0  # left padding
    outs = []
    for model in (teacher, remote):
        before = remote.client.requests_per_url[servers["a"].url]
        out = speculative_mixed_sample(student, model, ids.masked_fill(mask == 0, 0), mask, max_new_tokens=12,
                                       alpha=0.5, eos_token_id=7, pad_token_id=0, draft_tokens=3,
                                       generator=torch.Generator().manual_seed(5))
        outs.append((out, remote.client.requests_per_url[servers["a"].url] - before))
    (local, _), (served, requests) = outs
    assert served.teacher_forwards == served.rounds == local.rounds == requests > 1  # one request per round
    assert 0 < served.accepted_drafts < served.proposed_drafts  # some drafts were rejected: holes in the slots
    assert torch.equal(served.response_ids, local.response_ids)
    assert torch.equal(served.response_mask, local.response_mask)
    for name in ("student_logprobs", "teacher_logprobs", "mixed_logprobs"):
        torch.testing.assert_close(getattr(served, name), getattr(local, name), rtol=1e-5, atol=1e-5)
    # α = 1 has no served shortcut (the colocated one decodes with the teacher's cache): the draft/verify loop runs,
    # every token is the teacher's, and its log-probs are the colocated teacher's on those tokens
    from minillm.generation.sampling import teacher_forced_logprobs

    only = speculative_mixed_sample(student, remote, ids.masked_fill(mask == 0, 0), mask, max_new_tokens=8,
                                    alpha=1.0, eos_token_id=7, pad_token_id=0, draft_tokens=3,
                                    generator=torch.Generator().manual_seed(5))
    assert only.rounds > 1 and torch.equal(only.mixed_logprobs, only.teacher_logprobs)
    oracle = teacher_forced_logprobs(teacher, only.prompt_ids, only.prompt_mask, only.response_ids,
                                     only.response_mask)
    torch.testing.assert_close(only.teacher_logprobs, oracle, rtol=1e-5, atol=1e-5)
    remote.close()


def test_minillm_with_a_served_teacher_mixes_speculatively_like_the_colocated_run(servers, tmp_path, monkeypatch):
    """α = 0.3 with rollout.engine=speculative: the served run logs the colocated run's losses."""
    monkeypatch.setenv(protocol.TOKEN_ENV, TOKEN)
    mixed = [*MINILLM, "rollout.teacher_mix_alpha=0.3", "rollout.engine=speculative", "rollout.draft_tokens=3"]
    outs = {}
    for name, extra in (("colocated", []), ("served", [f"teacher.server={servers['a'].url}"])):
        outs[name] = tmp_path / name
        assert run(load_config("configs/tiny/minillm.yaml", [*mixed, f"output_dir={outs[name]}", *extra])) == 0
    served, reference = _losses(_rows(outs["served"])), _losses(_rows(outs["colocated"]))
    assert len(served) == len(reference) == 2
    for mine, theirs in zip(served, reference):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    # each phase's verification rounds were requests of their own (not prefetched), besides the prefetched scoring
    assert all(0.0 < row["teacher/prefetched"] < 1.0 for row in _rows(outs["served"]))


def test_a_server_killed_mid_run_retries_then_checkpoints_and_stops(servers, colocated, tmp_path, monkeypatch):
    """Server ``b`` dies when step 3 starts (no periodic checkpoint); step 3's first micro-batch fails after 2
    retries, the run rewinds the data cursor to the step start, checkpoints step 2 (the exact position) and exits
    75; resuming against a live server ends where the colocated run ends. (Last in the file: it kills ``b``.)"""
    from minillm.trainers import sft

    monkeypatch.setenv(protocol.TOKEN_ENV, TOKEN)
    doomed = servers["b"]
    sleeps = []
    monkeypatch.setattr("minillm.serve.client._pause", sleeps.append)
    original = sft.SFTTrainer._stateful_parts

    def kill_at_step_3(self):  # called when each step starts
        if self.step == 2:
            doomed.stop()
        return original(self)

    monkeypatch.setattr(sft.SFTTrainer, "_stateful_parts", kill_at_step_3)
    out = tmp_path / "run"
    code = run(_config(out, f"teacher.server={doomed.url}", "teacher.server_retries=2",
                       "teacher.server_timeout=5", "train.save_interval=0"))
    assert code == EXIT_PREEMPTED
    # exponential backoff between the 3 tries (of the micro-batch's request and of the step's next, prefetched)
    assert set(sleeps) == {0.5, 1.0} and len(sleeps) in (2, 3, 4)
    log = (out / "train.log").read_text()
    assert "teacher.server unavailable" in log and "no answer after 3 tries" in log and "exit status 75" in log
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert [r["step"] for r in _rows(out)] == [1, 2]
    monkeypatch.setattr(sft.SFTTrainer, "_stateful_parts", original)
    assert run(_config(out, f"teacher.server={servers['a'].url}"), resume="auto") == 0
    for mine, theirs in zip(_losses(_rows(out)), _losses(_rows(colocated))):
        assert mine == pytest.approx(theirs, rel=1e-6, abs=1e-7)


def test_minillm_stops_cleanly_when_the_server_dies_in_a_learning_step(servers, tmp_path, monkeypatch):
    """Server ``a`` dies when step 2's first micro-batch starts learning (its PT loss asks the teacher): the run
    checkpoints step 1 mid-phase (rollout buffer, PPO position, corpus cursor rewound) and exits 75; resumed with the
    teacher loaded locally it ends on the colocated run's losses. (Last in the file: it kills ``a``.)"""
    from minillm.trainers.minillm import MiniLLMTrainer

    monkeypatch.setenv(protocol.TOKEN_ENV, TOKEN)
    monkeypatch.setattr("minillm.serve.client._pause", lambda seconds: None)
    original = MiniLLMTrainer.learn_micro_step

    def kill_at_step_2(self, perm):
        if self.step == 1:
            servers["a"].stop()
        return original(self, perm)

    reference, out = tmp_path / "colocated", tmp_path / "served"
    assert run(load_config("configs/tiny/minillm.yaml", [*MINILLM, f"output_dir={reference}"])) == 0
    monkeypatch.setattr(MiniLLMTrainer, "learn_micro_step", kill_at_step_2)
    served = [*MINILLM, f"output_dir={out}", f"teacher.server={servers['a'].url}", "teacher.server_retries=1"]
    assert run(load_config("configs/tiny/minillm.yaml", served)) == EXIT_PREEMPTED
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert "teacher.server unavailable" in (out / "train.log").read_text()
    monkeypatch.setattr(MiniLLMTrainer, "learn_micro_step", original)
    resumed = load_config("configs/tiny/minillm.yaml", [*MINILLM, f"output_dir={out}"])
    assert run(resumed, resume="auto") == 0
    mine, theirs = _losses(_rows(out)), _losses(_rows(reference))
    assert len(mine) == len(theirs) == 2
    for a, b in zip(mine, theirs):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
