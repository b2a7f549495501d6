"""``minillm-bench --served``: what serving the teacher (``minillm-teacher-serve``) costs and saves.

* bytes per scored token on the wire: the final hidden states (fp32, bf16) and top-k log-probs as the server
  really sends them (safetensors bodies, measured), against full logits (V numbers, computed: the server never
  sends them) — the reason the served path sends hidden states and applies the LM head on the trainer;
* the teacher-scoring phase (forward, then every response token's log-prob through the head, chunked) colocated
  vs through :class:`minillm.serve.remote.RemoteTeacher`, and that both give the same log-probs.

The server runs in this process (uvicorn in a thread, loopback, a random bearer token) on the same device, so the
served time is the colocated time plus serialisation and HTTP, not a second machine's speed-up.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time

import torch

from ..losses.heads import hidden_and_head
from ..serve import protocol
from ..serve.client import TeacherClient
from ..serve.remote import RemoteTeacher
from ..serve.server import TeacherScorer, build_app

SCORE_CHUNK = 1024  # rows of [N, V] logits at once when scoring


class _IdsOnly:
    """A tokenizer stand-in for random-weight bench models, which have none: ids 0..V-1, no EOS/BOS."""

    eos_token_id = bos_token_id = None

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def get_vocab(self) -> dict[str, int]:
        return {str(i): i for i in range(self.size)}


def _score(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(x_{t+1} | x_≤t) for every position but the last: the teacher-scoring phase."""
    with torch.no_grad():
        hidden, head = hidden_and_head(model, ids, mask)
        flat, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1)
        out = [torch.log_softmax(head(flat[i: i + SCORE_CHUNK]).float(), -1)
               .gather(-1, targets[i: i + SCORE_CHUNK, None])[:, 0] for i in range(0, flat.shape[0], SCORE_CHUNK)]
    return torch.cat(out).reshape(ids.shape[0], -1)


def _median_seconds(fn, repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    out, times = fn(), []  # one untimed warm-up
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def measure_served(teacher, input_ids: torch.Tensor, *, top_k: int = 64, repeats: int = 3) -> dict:
    """Bytes per token and colocated vs served scoring time of ``teacher`` on ``input_ids`` [B, S]."""
    import uvicorn

    device = input_ids.device
    head = teacher.get_output_embeddings()
    rows, hidden_size = head.weight.shape
    ids, mask = input_ids, torch.ones_like(input_ids)
    tokens = ids.numel()
    token = secrets.token_hex(16)
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[head.weight.dtype]
    scorer = TeacherScorer(teacher, _IdsOnly(rows), model_path="(minillm-bench teacher)", revision=None,
                           device=device, dtype=dtype)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(scorer, token=token, max_batch_tokens=max(tokens, 1)),
                                           host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="bench-teacher-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not server.started:
            raise RuntimeError("minillm-bench --served: the in-process teacher server did not start")
        client = TeacherClient(f"http://127.0.0.1:{port}", token=token, retries=0, timeout=600)
        request = protocol.encode({"input_ids": ids, "attention_mask": mask})
        measured = {}
        for name, options in (("hidden_fp32", {"outputs": "hidden", "hidden_dtype": "fp32"}),
                              ("hidden_bf16", {"outputs": "hidden", "hidden_dtype": "bf16"}),
                              (f"top{top_k}", {"outputs": "topk", "top_k": top_k})):
            body = protocol.encode({"input_ids": ids, "attention_mask": mask}, {k: str(v) for k, v in options.items()})
            measured[name] = len(client._call("POST", "score", body)) / tokens
        remote = RemoteTeacher(head, teacher.config, client, hidden_dtype=dtype)
        colocated_s, colocated = _median_seconds(lambda: _score(teacher, ids, mask), repeats, device)
        served_s, served = _median_seconds(lambda: _score(remote, ids, mask), repeats, device)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    k = min(top_k, rows)
    return {
        "tokens": tokens, "vocab_rows": rows, "hidden_size": hidden_size,
        "bytes_per_token": {**measured, "full_logits_fp32": 4 * rows, "full_logits_bf16": 2 * rows},
        "payload_bytes_per_token": {"hidden_fp32": 4 * hidden_size, "hidden_bf16": 2 * hidden_size,
                                    f"top{top_k}": k * (4 + 8), "full_logits_fp32": 4 * rows,
                                    "full_logits_bf16": 2 * rows},
        "request_bytes_per_token": len(request) / tokens,
        "scoring_seconds": {"colocated": colocated_s, "served": served_s},
        "served_over_colocated": served_s / colocated_s if colocated_s else None,
        "max_logprob_difference": float((served - colocated).abs().max()),
        "note": "bytes: measured safetensors response bodies (header included) except full logits (4 or 2 x V, "
                "never sent); the server runs in this process on the same device: served time is the colocated "
                "work plus serialisation and HTTP (shared-CPU noise aside), not a second machine's speed-up",
    }
