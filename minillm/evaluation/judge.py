"""The paper's GPT-4 feedback score through any OpenAI-compatible chat-completions endpoint.

MiniLLM (§3.1, Table 1) asks a strong LLM to rate the gold answer and the model's answer to each prompt on
a 1–10 scale and reports 100 · Σ model scores / Σ gold scores over the test set. This module does the same
with a judge prompt of our own (:data:`JUDGE_TEMPLATE`), against any endpoint that speaks the OpenAI
``/chat/completions`` protocol (OpenAI, Azure-compatible gateways, vLLM, llama.cpp server, ...).

Configuration (argument, else environment, else default):

* base URL: ``base_url`` / ``MINILLM_JUDGE_BASE_URL`` / ``OPENAI_BASE_URL`` / ``https://api.openai.com/v1``
* API key:  ``api_key`` / ``MINILLM_JUDGE_API_KEY`` / ``OPENAI_API_KEY`` (required)
* model:    ``model`` / ``MINILLM_JUDGE_MODEL`` / ``"gpt-4o"``

Only the standard library is used (``urllib.request`` + ``json``). The key travels only in the
``Authorization`` header; it is never logged, and it is scrubbed from every error message and from the
client's repr. Requests use temperature 0 and are retried with exponential backoff on HTTP 429, 5xx and
connection errors.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from ..errors import UserError

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MODEL",
    "JUDGE_SYSTEM_PROMPT",
    "JUDGE_TEMPLATE",
    "JudgeClient",
    "JudgeError",
    "JudgeParseError",
    "build_judge_messages",
    "parse_scores",
]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o"
BASE_URL_ENV = ("MINILLM_JUDGE_BASE_URL", "OPENAI_BASE_URL")
API_KEY_ENV = ("MINILLM_JUDGE_API_KEY", "OPENAI_API_KEY")
MODEL_ENV = "MINILLM_JUDGE_MODEL"

# HTTP answers that no retry can fix and that would fail every other request too: stop the whole run.
FATAL_STATUSES = (401, 403, 404)
_MAX_RETRY_AFTER_S = 60.0
_ERROR_SNIPPET_CHARS = 300

JUDGE_SYSTEM_PROMPT = "You are a careful and impartial judge of how well answers serve a user's request."

JUDGE_TEMPLATE = """\
Below is a user's request followed by two candidate answers, labelled Answer 1 and Answer 2. Judge how well \
each answer serves the user, weighing helpfulness, relevance, correctness, depth and a suitable level of \
detail. Give each answer a whole-number score from 1 (useless) to 10 (excellent). Neither the order in which \
the answers appear nor their length alone may sway your scores.

Reply in this format:
- First line: only the two scores, Answer 1's first, separated by a single space (for example: 7 5).
- From the second line on: a short justification of both scores.

### Request
{question}

### Answer 1
{reference_answer}

### Answer 2
{model_answer}
"""


class JudgeError(UserError, RuntimeError):
    """A judge request failed. ``status`` is the HTTP status when the endpoint answered, else None."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class JudgeParseError(JudgeError):
    """The judge answered, but its first line did not hold two scores in [0, 10]."""


def build_judge_messages(question: str, reference_answer: str, model_answer: str) -> list[dict[str, str]]:
    """The chat messages of one judgement: the gold answer is Answer 1, the model's answer Answer 2."""
    return [
        {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
        {"role": "user", "content": JUDGE_TEMPLATE.format(question=question.strip(),
                                                          reference_answer=reference_answer.strip(),
                                                          model_answer=model_answer.strip())},
    ]


_LABEL = re.compile(r"\b(?:answer|assistant|response)\s*[#:]?\s*[12]\b", re.IGNORECASE)
_OUT_OF_TEN = re.compile(r"\s*/\s*10(?:\.0+)?\b")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")


def parse_scores(text: str) -> tuple[float, float]:
    """(reference score, model score): the first two numbers on the first non-empty line of the reply.

    Tolerates decoration such as ``**8** **6**``, ``8/10 6/10``, ``Scores: 8, 6`` and
    ``Answer 1: 8, Answer 2: 6`` (labels and "/10" are removed before reading numbers). Raises
    :class:`JudgeParseError` when there are fewer than two numbers or a score lies outside [0, 10].
    """
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        raise JudgeParseError("judge reply is empty; expected 'score1 score2' on its first line")
    first = _OUT_OF_TEN.sub(" ", _LABEL.sub(" ", lines[0]))
    numbers = [float(m) for m in _NUMBER.findall(first)]
    if len(numbers) < 2:
        raise JudgeParseError(f"judge reply's first line holds no two scores: {lines[0][:120]!r}")
    ref_score, model_score = numbers[0], numbers[1]
    if not (0 <= ref_score <= 10 and 0 <= model_score <= 10):
        raise JudgeParseError(f"judge scores must lie in [0, 10], got {ref_score:g} and {model_score:g} "
                              f"from {lines[0][:120]!r}")
    return ref_score, model_score


def _first_env(names: Sequence[str]) -> Optional[str]:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _without_credentials(url: str) -> str:
    """The URL with any user:password@ part removed, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


class JudgeClient:
    """An LLM judge behind an OpenAI-compatible endpoint (configuration: see the module docstring).

    ``max_retries`` counts retries after the first attempt; the wait before retry k (0-based) is
    ``backoff · 2**k`` seconds, or the server's ``Retry-After`` when it sends one (capped at 60 s).
    """

    def __init__(self, base_url: Optional[str] = None, model: Optional[str] = None, api_key: Optional[str] = None,
                 timeout: float = 60, max_retries: int = 3, *, backoff: float = 1.0, max_tokens: int = 512):
        self.base_url = (base_url or _first_env(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
        self.model = model or os.environ.get(MODEL_ENV, "").strip() or DEFAULT_MODEL
        key = api_key or _first_env(API_KEY_ENV)
        if not key:
            raise JudgeError("no API key for the LLM judge: pass api_key=... or set the environment variable "
                             f"{API_KEY_ENV[0]} (or {API_KEY_ENV[1]}); for a local server without auth any "
                             "non-empty value works")
        self.__key = key  # name-mangled: not a public attribute, never printed
        if max_retries < 0:
            raise ValueError(f"JudgeClient: max_retries must be ≥ 0, got {max_retries}")
        self.timeout, self.max_retries, self.backoff, self.max_tokens = timeout, max_retries, backoff, max_tokens

    @property
    def url(self) -> str:
        """The chat-completions URL (``base_url`` may already end with /chat/completions)."""
        if self.base_url.endswith("/chat/completions"):
            return self.base_url
        return self.base_url + "/chat/completions"

    def __repr__(self) -> str:
        return (f"JudgeClient(base_url={_without_credentials(self.base_url)!r}, model={self.model!r}, "
                f"api_key=<hidden>, timeout={self.timeout}, max_retries={self.max_retries})")

    def _scrub(self, text: str) -> str:
        """Cut a server-provided text for an error message, with any copy of the key masked."""
        return text.replace(self.__key, "***")[:_ERROR_SNIPPET_CHARS]

    # ------------------------------------------------------------------------------------------ requests
    def complete(self, messages: list[dict[str, str]]) -> str:
        """One deterministic (temperature 0) chat completion; returns the first choice's text."""
        payload = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                              "max_tokens": self.max_tokens}).encode("utf-8")
        where = _without_credentials(self.url)
        last_problem, last_status = "", None
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=payload, method="POST", headers={
                "Content-Type": "application/json", "Accept": "application/json",
                "User-Agent": "minillm-judge", "Authorization": f"Bearer {self.__key}"})
            wait = self.backoff * 2 ** attempt
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
                return self._reply_text(body, where)
            except urllib.error.HTTPError as err:
                detail = self._scrub(_read_quietly(err))
                if err.code != 429 and err.code < 500:
                    raise JudgeError(f"judge endpoint {where} answered HTTP {err.code} ({err.reason}): {detail}"
                                     + (" — check the API key" if err.code in (401, 403) else ""),
                                     status=err.code) from None
                last_problem, last_status = f"HTTP {err.code} ({err.reason}): {detail}", err.code
                wait = _retry_after(err, wait)
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as err:
                reason = getattr(err, "reason", err)
                last_problem, last_status = f"{type(err).__name__}: {self._scrub(str(reason))}", None
            if attempt < self.max_retries:
                time.sleep(wait)
        raise JudgeError(f"judge endpoint {where} failed after {self.max_retries + 1} attempts; last: {last_problem}",
                         status=last_status)

    def _reply_text(self, body: bytes, where: str) -> str:
        try:
            data = json.loads(body.decode("utf-8"))
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
            snippet = self._scrub(body.decode("utf-8", "replace"))
            raise JudgeError(f"judge endpoint {where} sent a reply that is not a chat completion: "
                             f"{snippet!r}") from None
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise JudgeError(f"judge endpoint {where} sent a completion without text content")
        return content

    # ------------------------------------------------------------------------------------------ scoring
    def score_pair(self, question: str, reference_answer: str, model_answer: str) -> tuple[float, float]:
        """(reference score, model score) on the judge's 1–10 scale; JudgeError/JudgeParseError on failure."""
        return parse_scores(self.complete(build_judge_messages(question, reference_answer, model_answer)))

    def feedback_score(self, questions: Sequence[str], references: Sequence[str], answers: Sequence[str],
                       workers: int = 4) -> dict[str, Any]:
        """The paper's feedback score: 100 · Σ model scores / Σ reference scores over the judged pairs.

        Pairs whose request fails after retries or whose reply cannot be parsed are counted in ``failed`` and
        left out of both sums; an authentication or not-found answer (HTTP 401/403/404) stops the run with a
        :class:`JudgeError`. Returns ``score`` (None when nothing was judged or Σ reference = 0), ``n`` (pairs
        judged), ``failed``, ``total``, ``reference_mean``, ``model_mean``, ``scores`` (per pair
        ``[ref, model]`` or None, in input order) and ``errors`` (``{"index", "error"}`` per failed pair).
        """
        if not (len(questions) == len(references) == len(answers)):
            raise ValueError(f"feedback_score: {len(questions)} questions, {len(references)} references and "
                             f"{len(answers)} answers; they must pair up")
        if workers < 1:
            raise ValueError(f"feedback_score: workers must be ≥ 1, got {workers}")

        def judge(i: int) -> tuple[Optional[tuple[float, float]], Optional[str]]:
            try:
                return self.score_pair(questions[i], references[i], answers[i]), None
            except JudgeError as err:
                if err.status in FATAL_STATUSES:
                    raise
                return None, str(err)

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minillm-judge")
        try:
            futures = [pool.submit(judge, i) for i in range(len(questions))]
            results = [future.result() for future in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        judged = [pair for pair, _ in results if pair is not None]
        ref_total, model_total = sum(r for r, _ in judged), sum(m for _, m in judged)
        return {
            "score": 100.0 * model_total / ref_total if judged and ref_total > 0 else None,
            "n": len(judged),
            "failed": len(results) - len(judged),
            "total": len(results),
            "reference_mean": ref_total / len(judged) if judged else None,
            "model_mean": model_total / len(judged) if judged else None,
            "scores": [list(pair) if pair is not None else None for pair, _ in results],
            "errors": [{"index": i, "error": error} for i, (_, error) in enumerate(results) if error is not None],
        }


def _read_quietly(err: urllib.error.HTTPError) -> str:
    try:
        return err.read().decode("utf-8", "replace")
    except Exception:  # the body of an error answer is only a courtesy for the message
        return ""


def _retry_after(err: urllib.error.HTTPError, default: float) -> float:
    """The server's Retry-After in seconds when given as a number, else ``default``; capped."""
    value = err.headers.get("Retry-After") if err.headers is not None else None
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER_S) if value is not None else default
    except ValueError:
        return default
