"""The HTTP service of ``minillm-teacher-serve``: a Starlette app over one teacher model.

Why Starlette + uvicorn: the standard small ASGI pair (BSD-licensed, maintained by the Encode team, used under
FastAPI by most Python model servers), two pure-Python wheels with no compiled parts to build; the app is a few
routes, so a framework adds nothing. Inference is synchronous torch, run in the worker thread pool behind a lock:
one batch at a time per process (one process per GPU), while the event loop keeps accepting and refusing requests.

Endpoints (:mod:`minillm.serve.protocol` describes the bodies):

* ``GET /v1/info`` → JSON: model, revision, model_type, vocab size (the tokenizer's and the head's rows), hidden
  size, layers, dtype, the tokenizer fingerprint, the logit post-processing the head needs, the batch limit and
  the number of batches scored so far;
* ``POST /v1/score`` (safetensors body) → safetensors body with the outputs asked for.

Errors are JSON ``{"error": message}``: 401 without the bearer token when ``MINILLM_TEACHER_TOKEN`` is set
(compared in constant time; the token is never logged), 413 past ``--max-batch-tokens``, 400 for a malformed body.
"""

from __future__ import annotations

import hmac
import threading
import time

import torch

from ..losses.heads import hidden_and_head, logit_postprocessing
from . import protocol

LOGPROB_CHUNK_TOKENS = 1024  # rows of [N, V] logits held at once for the log-prob outputs


class TeacherScorer:
    """The model, its tokenizer fingerprint and the lock; ``score`` is one batch, under the lock."""

    def __init__(self, model, tokenizer, *, model_path: str, revision: str | None, device: torch.device,
                 dtype: str) -> None:
        self.model, self.device, self.lock = model, device, threading.Lock()
        self.batches = 0  # scored so far (reported by /v1/info: which of several servers got work)
        self.vocab = len(tokenizer)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head = model.get_output_embeddings()
        _, post = logit_postprocessing(model)
        self.info = {
            "api": protocol.API, "model": model_path, "model_type": getattr(config, "model_type", ""),
            "revision": revision or getattr(model.config, "_commit_hash", None),
            "vocab_size": self.vocab, "head_rows": int(head.weight.shape[0]),
            "hidden_size": int(head.weight.shape[1]), "num_hidden_layers": getattr(config, "num_hidden_layers", None),
            "dtype": dtype, "device": str(device), "tokenizer_sha256": protocol.tokenizer_fingerprint(tokenizer),
            "logit_postprocessing": post or "none",
        }
        # hidden_and_head checks once that head(last hidden) reproduces the model's own logits; a model it cannot
        # reproduce must not be served, since the trainer computes every loss as head(hidden).
        probe = torch.arange(min(4, self.vocab), device=device)[None]
        with torch.no_grad():
            hidden_and_head(model, probe, torch.ones_like(probe))

    def _trim(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.vocab] if logits.shape[-1] > self.vocab else logits

    @torch.no_grad()
    def score(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None, options: dict
              ) -> dict[str, torch.Tensor]:
        if int(ids.max()) >= self.vocab or int(ids.min()) < 0:
            raise protocol.ProtocolError(f"input_ids holds ids outside the tokenizer's vocabulary [0, {self.vocab})")
        with self.lock:
            self.batches += 1
            dev = self.device
            hidden, head = hidden_and_head(self.model, ids.to(dev), mask.to(dev),
                                           positions.to(dev) if positions is not None else None, trim=self._trim)
            out = {}
            if "hidden" in options["outputs"]:
                out["hidden"] = hidden.to(protocol.HIDDEN_DTYPES[options["hidden_dtype"]]).cpu()
            want_tokens, k = "token_logprobs" in options["outputs"], options["top_k"]
            if want_tokens or "topk" in options["outputs"]:
                out.update(self._logprobs(hidden, head, ids.to(dev), options["temperature"],
                                          k if "topk" in options["outputs"] else 0, want_tokens))
        return out

    def _logprobs(self, hidden, head, ids, temperature: float, k: int, want_tokens: bool) -> dict[str, torch.Tensor]:
        b, s, h = hidden.shape
        flat, targets = hidden.reshape(b * s, h), torch.cat([ids[:, 1:], ids[:, :1]], 1).reshape(-1)
        tokens, top_v, top_i = [], [], []
        for start in range(0, b * s, LOGPROB_CHUNK_TOKENS):
            logp = torch.log_softmax(head(flat[start: start + LOGPROB_CHUNK_TOKENS]).float() / temperature, -1)
            if want_tokens:
                tokens.append(logp.gather(-1, targets[start: start + LOGPROB_CHUNK_TOKENS, None])[:, 0])
            if k:
                v, i = logp.topk(min(k, logp.shape[-1]), -1)
                top_v.append(v)
                top_i.append(i)
        out = {}
        if want_tokens:  # row t scores token t+1: the last column has no next token
            out["token_logprobs"] = torch.cat(tokens).reshape(b, s)[:, :-1].cpu()
        if k:
            out["topk_logprobs"] = torch.cat(top_v).reshape(b, s, -1).cpu()
            out["topk_ids"] = torch.cat(top_i).reshape(b, s, -1).cpu()
        return out


def build_app(scorer: TeacherScorer, *, token: str | None, max_batch_tokens: int, log=None):
    """The Starlette app. ``token``: the bearer token every request must carry (None: no authentication)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    expected = f"Bearer {token}".encode() if token else None
    # ids, mask and positions as int64, plus the safetensors header
    max_body = max_batch_tokens * 3 * 8 + 64 * 1024
    info = {**scorer.info, "max_batch_tokens": max_batch_tokens, "auth": token is not None}

    def refuse(request: Request):
        if expected is None:
            return None
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):  # constant time: the token is not guessable byte by byte
            return JSONResponse({"error": f"missing or wrong bearer token (the server requires the token in "
                                          f"{protocol.TOKEN_ENV}; send `Authorization: Bearer <token>`)"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return None

    async def get_info(request: Request):
        return refuse(request) or JSONResponse({**info, "scored_batches": scorer.batches})

    async def score(request: Request):
        denied = refuse(request)
        if denied is not None:
            return denied
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            return JSONResponse({"error": f"the body has {length} bytes, more than a batch of --max-batch-tokens="
                                          f"{max_batch_tokens} tokens needs ({max_body}); send smaller batches"},
                                status_code=413)
        body = bytearray()
        async for piece in request.stream():  # a chunked body has no content-length: count while reading
            body += piece
            if len(body) > max_body:
                return JSONResponse({"error": f"the body exceeds the {max_body} bytes a batch of --max-batch-tokens="
                                              f"{max_batch_tokens} tokens needs; send smaller batches"},
                                    status_code=413)
        body = bytes(body)
        try:
            tensors, metadata = protocol.decode(body)
            options = protocol.request_options(metadata, dict(request.query_params))
            ids, mask, positions = protocol.check_inputs(tensors)
        except protocol.ProtocolError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        if ids.numel() > max_batch_tokens:
            return JSONResponse({"error": f"the batch has {ids.shape[0]} x {ids.shape[1]} = {ids.numel()} tokens, "
                                          f"more than --max-batch-tokens={max_batch_tokens}; send smaller batches"},
                                status_code=413)
        start = time.perf_counter()
        try:
            out = await run_in_threadpool(scorer.score, ids, mask, positions, options)
        except protocol.ProtocolError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        if log is not None:
            log.debug("scored %s in %.3fs", tuple(ids.shape), time.perf_counter() - start)
        return Response(protocol.encode(out), media_type="application/octet-stream")

    return Starlette(routes=[Route(f"/{protocol.API}/info", get_info, methods=["GET"]),
                             Route(f"/{protocol.API}/score", score, methods=["POST"])])
