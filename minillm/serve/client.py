"""HTTP client of ``minillm-teacher-serve`` over one or several URLs (stdlib ``http.client``: no dependency).

Each request goes to the next URL in turn (round-robin), so several server processes (one per GPU) share the
batches. A failed try (connection refused or reset, a timeout, a 5xx answer) is retried on the next URL after an
exponentially growing pause (``backoff`` · 2^attempt, at most 30 s); after ``retries`` retries the client raises
:class:`TeacherServerUnavailable`. A 4xx answer (wrong token, batch too large, malformed body) is not retried: it
would fail again, so :class:`TeacherServerError` carries the server's message at once.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import threading
import time
from urllib.parse import urlsplit

from ..errors import UserError
from . import protocol


class TeacherServerUnavailable(UserError, ConnectionError):
    """Every try to reach the teacher server(s) failed; the trainers checkpoint and stop on it."""


class TeacherServerError(UserError, RuntimeError):
    """The teacher server refused a request (4xx) or serves another model than ``teacher.path``."""


def parse_urls(value) -> list[str]:
    """``teacher.server``: one URL or several, comma-separated (or a list), each http://host:port[/prefix]."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    urls = [u.strip().rstrip("/") for u in items if u.strip()]
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"`{url}` is not a server URL (http://host:port)")
    if not urls:
        raise ValueError("no URL given")
    return urls


class TeacherClient:
    """Requests to the teacher server(s): ``info(url)`` and ``score(tensors, options)``; thread-safe."""

    def __init__(self, urls, *, token: str | None = None, timeout: float = 60.0, retries: int = 5,
                 backoff: float = 0.5) -> None:
        self.urls = parse_urls(urls)
        self.token = token if token is not None else (os.environ.get(protocol.TOKEN_ENV) or None)
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self.requests_per_url = {url: 0 for url in self.urls}

    def _request(self, url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        parts = urlsplit(url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname, parts.port, timeout=self.timeout)
        headers = {"Content-Type": "application/octet-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, f"{parts.path}/{protocol.API}/{path}", body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def _call(self, method: str, path: str, body: bytes | None = None, url: str | None = None) -> bytes:
        with self._lock:
            first = next(self._turn)
        urls = [url] if url is not None else self.urls
        last, started = None, time.monotonic()
        for attempt in range(self.retries + 1):
            target = urls[(first + attempt) % len(urls)]
            try:
                status, payload = self._request(target, method, path, body)
            except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out
                last = f"{target}: {type(error).__name__}: {error}"
            else:
                if status == 200:
                    with self._lock:
                        self.requests_per_url[target] = self.requests_per_url.get(target, 0) + 1
                    return payload
                message = _error_message(payload)
                if 400 <= status < 500:
                    hint = (f"; export the server's token in {protocol.TOKEN_ENV}" if status == 401 else "")
                    raise TeacherServerError(f"teacher.server {target} refused the request ({status}): "
                                             f"{message}{hint}")
                last = f"{target}: HTTP {status}: {message}"
            if attempt < self.retries:
                _pause(min(self.backoff * 2 ** attempt, 30.0))
        raise TeacherServerUnavailable(
            f"teacher.server: no answer after {self.retries + 1} tries over {time.monotonic() - started:.1f}s "
            f"(last: {last}); check that minillm-teacher-serve runs at {', '.join(urls)} (teacher.server_retries "
            "and teacher.server_timeout set the patience)")

    def info(self, url: str) -> dict:
        return json.loads(self._call("GET", "info", url=url))

    def score(self, tensors: dict, options: dict[str, str], url: str | None = None) -> dict:
        body = protocol.encode(tensors, {k: str(v) for k, v in options.items()})
        out, _ = protocol.decode(self._call("POST", "score", body, url=url))
        return out


def _pause(seconds: float) -> None:
    """The backoff between tries (a function of its own, so tests can record the pauses without waiting them)."""
    time.sleep(seconds)


def _error_message(payload: bytes) -> str:
    try:
        return str(json.loads(payload)["error"])
    except (ValueError, KeyError, TypeError):
        return payload[:200].decode(errors="replace")
