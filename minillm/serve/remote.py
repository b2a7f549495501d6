""":class:`RemoteTeacher`: the teacher of a run with ``teacher.server``, as a module holding only its LM head.

Its ``forward`` sends the token ids to ``minillm-teacher-serve``, receives the final hidden states and applies the
head (and the family's logit post-processing) locally. It answers like a HF causal LM (``.logits``,
``.hidden_states[-1]``, ``get_output_embeddings()``, ``.config``), so :func:`minillm.losses.heads.hidden_and_head`,
``response_hidden``, ``teacher(...).logits`` and ``teacher_forced_logprobs`` work unchanged, and the chunked losses
read the same hidden states and head as with the colocated teacher: the losses are exact, not a top-k
approximation.

The head is read from ``teacher.path``'s weight files alone: the architecture is built on the ``meta`` device from
its config (no memory) to find which parameter is the output embedding (tied embeddings included), and only that
tensor (and its bias) is read from the safetensors shard(s).

:meth:`RemoteTeacher.prefetch` starts a request in a background thread; a later ``forward`` with the same inputs
takes its result, so the server's time hides behind the student's work. :meth:`RemoteTeacher.pop_timings` reports
how much of it was hidden, and which share of the forwards had been prefetched.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..losses.heads import _log_prob_gap, logit_postprocessing
from ..models import TORCH_DTYPES, load_model_shape
from .client import TeacherClient, TeacherServerError

MAX_PENDING = 2  # prefetched requests held at once: the next micro-batch or two, never an unbounded queue


def _weight_index(cfg) -> dict[str, Path]:
    """tensor name → safetensors file of ``cfg.path`` (a local folder, or a hub id through the HF cache)."""
    folder = Path(cfg.path).expanduser()

    def fetch(name: str) -> Path | None:
        if folder.is_dir():
            return folder / name if (folder / name).is_file() else None
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(cfg.path, name, revision=cfg.revision))
        except Exception:  # noqa: BLE001 — absent file: try the other layout
            return None

    index = fetch("model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: fetch(name) for name in set(weight_map.values())}
        return {key: files[name] for key, name in weight_map.items() if files[name] is not None}
    single = fetch("model.safetensors")
    if single is None:
        raise FileNotFoundError(f"teacher.server: `{cfg.path}` has no model.safetensors(.index.json); the served "
                                "teacher's LM head is read from its safetensors weights")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {key: single for key in f.keys()}


def _read(index: dict[str, Path], names: list[str], what: str, path: str) -> torch.Tensor:
    from safetensors import safe_open

    for name in names:
        if name in index:
            with safe_open(str(index[name]), "pt") as f:
                return f.get_tensor(name)
    raise FileNotFoundError(f"teacher.server: no tensor {names} (the {what}) in the weights of `{path}`")


def load_lm_head(cfg) -> tuple[torch.nn.Linear, object]:
    """(the teacher's output-embedding layer as an ``nn.Linear`` in ``cfg.dtype`` on the CPU, its HF config),
    reading only that tensor (and its bias) from the weight files."""
    shape = load_model_shape(cfg)  # meta device: names and shapes, no memory
    emb = shape.get_output_embeddings()
    if emb is None or getattr(emb, "weight", None) is None:
        raise ValueError(f"teacher.server: {type(shape).__name__} has no output embeddings (LM head) to apply")
    # every name the head's weight goes by: with tied embeddings the files may hold only the input embedding
    params = list(shape.named_parameters(remove_duplicate=False))
    names = [n for n, p in params if p is emb.weight]
    bias = getattr(emb, "bias", None)
    bias_names = [n for n, p in params if bias is not None and p is bias]
    index = _weight_index(cfg)
    dtype = TORCH_DTYPES[cfg.dtype]
    weight = _read(index, names, "LM head", cfg.path)
    if tuple(weight.shape) != tuple(emb.weight.shape):
        raise ValueError(f"teacher.server: the LM head in `{cfg.path}` has shape {tuple(weight.shape)}, its config "
                         f"says {tuple(emb.weight.shape)}")
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(_read(index, bias_names, "LM head bias", cfg.path))
    return head.requires_grad_(False), shape.config


class RemoteOutput(dict):
    """What a HF causal LM returns, as far as the trainers read it: ``logits`` and ``hidden_states``."""

    __getattr__ = dict.get


class RemoteTeacher(torch.nn.Module):
    """The teacher's LM head plus a :class:`minillm.serve.client.TeacherClient`; behaves as the frozen teacher."""

    is_remote_teacher = True  # strategies keep it as it is (no DeepSpeed engine for a head)

    def __init__(self, head: torch.nn.Linear, config, client: TeacherClient, hidden_dtype: str = "fp32") -> None:
        super().__init__()
        self.lm_head, self.config, self.client, self.hidden_dtype = head, config, client, hidden_dtype
        self._post = logit_postprocessing(self)[0]
        self._pending: deque[tuple[tuple, Future]] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._stats_lock = threading.Lock()
        self._request_s = self._wait_s = 0.0
        self._forwards = self._prefetched = 0  # forwards, and those answered by a prefetched request
        self.eval()

    @classmethod
    def from_config(cls, cfg) -> "RemoteTeacher":
        """From ``teacher`` (a ModelConfig with ``server`` set): the head from ``cfg.path``, the client from
        ``cfg.server``, ``server_timeout`` and ``server_retries``; every server is checked to serve that model."""
        head, config = load_lm_head(cfg)
        client = TeacherClient(cfg.server, timeout=cfg.server_timeout, retries=cfg.server_retries)
        teacher = cls(head, config, client, hidden_dtype="fp32" if cfg.dtype == "fp32" else cfg.dtype)
        for url in client.urls:
            teacher.verify(url)
        return teacher

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    # -- scoring ------------------------------------------------------------------------------------------------
    def _tensors(self, input_ids, attention_mask, position_ids) -> dict[str, torch.Tensor]:
        tensors = {"input_ids": input_ids.detach().long().cpu(),
                   "attention_mask": (attention_mask if attention_mask is not None
                                      else torch.ones_like(input_ids)).detach().long().cpu()}
        if position_ids is not None:
            tensors["position_ids"] = position_ids.detach().long().cpu()
        return tensors

    def _fetch(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        start = time.perf_counter()
        out = self.client.score(tensors, {"outputs": "hidden", "hidden_dtype": self.hidden_dtype})
        with self._stats_lock:
            self._request_s += time.perf_counter() - start
        return out["hidden"]

    def prefetch(self, input_ids, attention_mask=None, position_ids=None) -> Future:
        """Start scoring these inputs in the background (unless they already are); ``forward`` with equal inputs takes
        the result. At most :data:`MAX_PENDING` requests are held (the oldest unclaimed one is dropped)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=MAX_PENDING, thread_name_prefix="teacher-prefetch")
        tensors = self._tensors(input_ids, attention_mask, position_ids)
        key = self._key(tensors)
        for pending, future in self._pending:
            if self._same(pending, key):
                return future
        future = self._executor.submit(self._fetch, tensors)
        self._pending.append((key, future))
        while len(self._pending) > MAX_PENDING:
            self._pending.popleft()[1].cancel()
        return future

    @staticmethod
    def _key(tensors: dict[str, torch.Tensor]) -> tuple:
        return tuple(tensors.get(k) for k in ("input_ids", "attention_mask", "position_ids"))

    @staticmethod
    def _same(a: tuple, b: tuple) -> bool:
        return all((x is None and y is None) or (x is not None and y is not None and x.shape == y.shape
                                                 and torch.equal(x, y)) for x, y in zip(a, b))

    def _claim(self, tensors: dict[str, torch.Tensor]) -> Future | None:
        key = self._key(tensors)
        for i, (pending, future) in enumerate(self._pending):
            if self._same(pending, key):
                del self._pending[i]
                return future
        return None

    def hidden_states_for(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """The server's final hidden states [B, S, H] on the head's device and in its dtype."""
        tensors = self._tensors(input_ids, attention_mask, position_ids)
        future = self._claim(tensors)
        with self._stats_lock:
            self._forwards += 1
            self._prefetched += future is not None
        if future is not None:
            start = time.perf_counter()
            hidden = future.result()  # TeacherServerUnavailable raised in the thread surfaces here
            with self._stats_lock:
                self._wait_s += time.perf_counter() - start
        else:
            start = time.perf_counter()
            hidden = self._fetch(tensors)
            with self._stats_lock:
                self._wait_s += time.perf_counter() - start
        weight = self.lm_head.weight
        return hidden.to(device=weight.device, dtype=weight.dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states: bool = False,
                logits_to_keep: int = 0, use_cache=None, past_key_values=None, return_dict=None, **kwargs):
        if past_key_values is not None or use_cache:
            raise NotImplementedError("teacher.server: a served teacher scores whole sequences; it keeps no KV "
                                      "cache (teacher-mixed sampling needs rollout.engine=speculative, or "
                                      "rollout.teacher_mix_alpha=0)")
        if kwargs:
            raise TypeError(f"teacher.server: RemoteTeacher.forward got unsupported arguments {sorted(kwargs)}")
        hidden = self.hidden_states_for(input_ids, attention_mask, position_ids)
        kept = hidden[:, -logits_to_keep:] if isinstance(logits_to_keep, int) and logits_to_keep > 0 else hidden
        logits = self.lm_head(kept)
        if self._post is not None:
            logits = self._post(logits)
        return RemoteOutput(logits=logits, hidden_states=(hidden,) if output_hidden_states else None)

    def pop_timings(self) -> dict[str, float]:
        """Seconds of server requests and of waiting for them since the last call, and the fraction hidden behind
        other work (1: the trainer never waited; 0: every request was waited for in full)."""
        with self._stats_lock:
            request, wait, forwards, prefetched = self._request_s, self._wait_s, self._forwards, self._prefetched
            self._request_s = self._wait_s = 0.0
            self._forwards = self._prefetched = 0
        if request <= 0:
            return {}
        out = {"time/teacher_request": request, "time/teacher_wait": wait,
               "teacher/hidden_fraction": max(0.0, min(1.0, 1.0 - wait / request))}
        if forwards:  # the share of teacher forwards whose request was sent ahead (prefetched)
            out["teacher/prefetched"] = prefetched / forwards
        return out

    # -- identity -------------------------------------------------------------------------------------------------
    def verify(self, url: str) -> None:
        """Check that ``url`` serves the model whose head this holds: the server's log-probs of a probe must be
        what this head gives from its hidden states (to rounding), else a TeacherServerError naming the URL."""
        info = self.client.info(url)
        rows, hidden_size = self.lm_head.weight.shape
        if info.get("head_rows") != rows or info.get("hidden_size") != hidden_size:
            raise TeacherServerError(f"teacher.server {url} serves {info.get('model')} (head {info.get('head_rows')} x "
                                     f"{info.get('hidden_size')}), not the model of teacher.path (head {rows} x "
                                     f"{hidden_size})")
        vocab = int(info["vocab_size"])
        # the probe travels over HTTP (a host tensor); the head may live on the training device
        probe = torch.arange(min(8, vocab), dtype=torch.long, device="cpu")[None]
        out = self.client.score({"input_ids": probe, "attention_mask": torch.ones_like(probe)},
                                {"outputs": "hidden,token_logprobs", "hidden_dtype": "fp32"}, url=url)
        weight = self.lm_head.weight
        with torch.no_grad():
            logits = self.lm_head(out["hidden"][0, :-1].to(device=weight.device, dtype=weight.dtype))
            logits = (self._post(logits) if self._post is not None else logits)[..., :vocab]
            mine = torch.log_softmax(logits.float(), -1).gather(-1, probe[0, 1:, None].to(weight.device))[:, 0]
        theirs = out["token_logprobs"][0].float().to(mine.device)
        _, tolerance = _log_prob_gap(logits, logits)
        gap = float((mine - theirs).abs().max())
        if not gap <= tolerance:
            raise TeacherServerError(f"teacher.server {url} serves another model than teacher.path "
                                     f"(`{info.get('model')}`): its log-probs differ from the LM head read from "
                                     f"teacher.path by up to {gap:.3g} (rounding allows {tolerance:.3g}); point both "
                                     "at the same checkpoint")

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
