"""The LLM-judge client against a fake OpenAI-compatible server on 127.0.0.1 (no other network)."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from minillm.evaluation.judge import (
    JudgeClient,
    JudgeError,
    JudgeParseError,
    build_judge_messages,
    parse_scores,
)

KEY = "sk-test-0123456789abcdef"
WRONG_KEY = "sk-wrong-fedcba9876543210"


class FakeJudge:
    """A chat-completions server whose reply depends on the question found in the request.

    ``script[question]`` is a list of replies used one per request (the last one repeats); a reply is
    ``(status, content)`` where content is the judge text (wrapped in a completion) or, with ``raw=True``
    in a third slot, the raw body.
    """

    def __init__(self):
        self.script: dict[str, list[tuple]] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization")
                with fake.lock:
                    fake.requests.append({"path": self.path, "auth": auth, "body": body})
                if auth != f"Bearer {KEY}":
                    # Like real providers, echo the key that was sent: the client must scrub it.
                    return self._send(401, json.dumps({"error": {"message": f"Incorrect API key provided: {auth}"}}))
                prompt = body["messages"][-1]["content"]
                question = next((q for q in fake.script if f"### Request\n{q}\n" in prompt), None)
                if question is None:
                    return self._send(400, json.dumps({"error": {"message": "unknown question"}}))
                with fake.lock:
                    replies = fake.script[question]
                    reply = replies.pop(0) if len(replies) > 1 else replies[0]
                status, content, *raw = reply
                if raw:
                    return self._send(status, content)
                if status != 200:
                    return self._send(status, json.dumps({"error": {"message": content}}), retry_after="0")
                completion = {"id": "x", "object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                           "finish_reason": "stop"}]}
                return self._send(200, json.dumps(completion))

            def _send(self, status, text, retry_after=None):
                data = text.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if retry_after is not None:
                    self.send_header("Retry-After", retry_after)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def count(self, question: str) -> int:
        return sum(f"### Request\n{question}\n" in r["body"]["messages"][-1]["content"] for r in self.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fake():
    server = FakeJudge()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    # The user's own judge settings or proxies must not leak into the tests (all traffic stays on 127.0.0.1).
    for name in ("MINILLM_JUDGE_BASE_URL", "OPENAI_BASE_URL", "MINILLM_JUDGE_API_KEY", "OPENAI_API_KEY",
                 "MINILLM_JUDGE_MODEL", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def _client(fake, **kw):
    return JudgeClient(base_url=fake.base_url, model="judge-model", api_key=kw.pop("api_key", KEY),
                       timeout=5, backoff=0.01, **kw)


# ----------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, want", [
    ("8 6\nAnswer 1 is more complete.", (8.0, 6.0)),
    ("\n\n  9 3  \nreasons", (9.0, 3.0)),
    ("**7** **5**", (7.0, 5.0)),
    ("8/10 6/10", (8.0, 6.0)),
    ("10/10 9/10", (10.0, 9.0)),
    ("Scores: 7.5, 9", (7.5, 9.0)),
    ("Answer 1: 8, Answer 2: 6", (8.0, 6.0)),
])
def test_parse_scores_reads_the_first_two_numbers_of_the_first_line(text, want):
    assert parse_scores(text) == want


@pytest.mark.parametrize("text", ["", "   \n", "Both answers are fine.", "8\n6", "11 3", "Answer 1 is better."])
def test_parse_scores_rejects_replies_without_two_valid_scores(text):
    with pytest.raises(JudgeParseError):
        parse_scores(text)


# ----------------------------------------------------------------------------------------------- requests
def test_score_pair_sends_a_well_formed_deterministic_request(fake):
    fake.script["What is 2+2?"] = [(200, "8 6\nAnswer 1 is correct; Answer 2 is vague.")]
    client = _client(fake)
    assert client.score_pair("What is 2+2?", "It is 4.", "Probably 4-ish.") == (8.0, 6.0)
    (req,) = fake.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0
    prompt = body["messages"][-1]["content"]
    assert "What is 2+2?" in prompt and "It is 4." in prompt and "Probably 4-ish." in prompt
    assert prompt.index("It is 4.") < prompt.index("Probably 4-ish.")  # the reference is Answer 1
    assert body["messages"] == build_judge_messages("What is 2+2?", "It is 4.", "Probably 4-ish.")
    assert KEY not in json.dumps(body)  # the key travels in the header only


def test_feedback_score_is_the_model_to_reference_ratio(fake):
    fake.script.update({"q0": [(200, "8 6")], "q1": [(200, "10 7\nok")], "q2": [(200, "6 5")]})
    result = _client(fake).feedback_score(["q0", "q1", "q2"], ["r0", "r1", "r2"], ["a0", "a1", "a2"], workers=3)
    # Σ reference = 8 + 10 + 6 = 24, Σ model = 6 + 7 + 5 = 18 → 100 · 18/24 = 75
    assert result["score"] == pytest.approx(75.0)
    assert (result["n"], result["failed"], result["total"]) == (3, 0, 3)
    assert result["scores"] == [[8.0, 6.0], [10.0, 7.0], [6.0, 5.0]]  # input order, whatever the thread order
    assert result["reference_mean"] == pytest.approx(8.0) and result["model_mean"] == pytest.approx(6.0)
    json.dumps(result)  # the result is ready for a metrics file


def test_server_errors_and_rate_limits_are_retried(fake):
    fake.script["flaky"] = [(500, "overloaded"), (429, "slow down"), (200, "9 3")]
    fake.script["steady"] = [(200, "4 4")]
    result = _client(fake, max_retries=3).feedback_score(["flaky", "steady"], ["r", "r"], ["a", "a"])
    assert fake.count("flaky") == 3 and fake.count("steady") == 1
    assert result["failed"] == 0 and result["score"] == pytest.approx(100 * (3 + 4) / (9 + 4))


def test_exhausted_retries_and_malformed_replies_count_as_failed(fake):
    fake.script.update({
        "good": [(200, "8 4")],
        "chatty": [(200, "Both answers are decent.\n7 7")],  # scores not on the first line
        "out-of-range": [(200, "12 3")],
        "not-json": [(200, "<html>gateway</html>", "raw")],
        "no-choices": [(200, json.dumps({"object": "chat.completion", "choices": []}), "raw")],
        "down": [(503, "unavailable")],
    })
    questions = list(fake.script)
    result = _client(fake, max_retries=2).feedback_score(questions, ["r"] * 6, ["a"] * 6, workers=2)
    assert fake.count("down") == 3  # first try + 2 retries
    assert (result["n"], result["failed"], result["total"]) == (1, 5, 6)
    assert result["score"] == pytest.approx(50.0)
    assert [e["index"] for e in result["errors"]] == [1, 2, 3, 4, 5]
    assert "503" in result["errors"][4]["error"] and "3 attempts" in result["errors"][4]["error"]
    with pytest.raises(JudgeParseError, match="no two scores"):
        _client(fake).score_pair("chatty", "r", "a")


def test_nothing_judged_gives_no_score(fake):
    fake.script["bad"] = [(200, "no idea")]
    result = _client(fake).feedback_score(["bad"], ["r"], ["a"])
    assert result["score"] is None and result["n"] == 0 and result["failed"] == 1


def test_wrong_key_fails_fast_without_revealing_the_key(fake):
    fake.script["q"] = [(200, "8 6")]
    client = _client(fake, api_key=WRONG_KEY)
    with pytest.raises(JudgeError) as info:
        client.score_pair("q", "r", "a")
    err = info.value
    assert err.status == 401 and "401" in str(err) and "API key" in str(err)
    assert WRONG_KEY not in str(err) and WRONG_KEY not in repr(err) and err.__cause__ is None
    assert len(fake.requests) == 1  # an auth failure is not retried
    with pytest.raises(JudgeError) as info:  # and it stops a whole run instead of counting failures
        client.feedback_score(["q"] * 3, ["r"] * 3, ["a"] * 3)
    assert WRONG_KEY not in str(info.value)


def test_connection_errors_are_retried_then_reported():
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = JudgeClient(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=2, backoff=0.01, timeout=2)
    with pytest.raises(JudgeError, match="failed after 3 attempts") as info:
        client.complete([{"role": "user", "content": "hi"}])
    assert info.value.status is None and KEY not in str(info.value)


# ----------------------------------------------------------------------------------------------- configuration
def test_configuration_from_arguments_then_environment(monkeypatch):
    client = JudgeClient(api_key=KEY)
    assert (client.base_url, client.model) == ("https://api.openai.com/v1", "gpt-4o")
    assert client.url == "https://api.openai.com/v1/chat/completions"
    assert KEY not in repr(client) and "<hidden>" in repr(client)

    monkeypatch.setenv("OPENAI_BASE_URL", "http://openai.example/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-env")
    client = JudgeClient()
    assert client.base_url == "http://openai.example/v1" and "sk-openai-env" not in repr(client)

    monkeypatch.setenv("MINILLM_JUDGE_BASE_URL", "http://judge.example/api/chat/completions")
    monkeypatch.setenv("MINILLM_JUDGE_API_KEY", "sk-judge-env")
    monkeypatch.setenv("MINILLM_JUDGE_MODEL", "my-judge")
    client = JudgeClient()
    assert (client.url, client.model) == ("http://judge.example/api/chat/completions", "my-judge")
    assert JudgeClient(base_url="http://arg.example/v1", model="m").base_url == "http://arg.example/v1"
    assert "sk-judge-env" not in repr(client)


def test_missing_key_names_the_variables():
    with pytest.raises(JudgeError, match="MINILLM_JUDGE_API_KEY.*OPENAI_API_KEY"):
        JudgeClient(base_url="http://127.0.0.1:9/v1")


def test_credentials_in_the_base_url_stay_out_of_repr():
    client = JudgeClient(base_url="http://user:s3cret@127.0.0.1:9/v1", api_key=KEY)
    assert "s3cret" not in repr(client) and "127.0.0.1:9/v1" in repr(client)
