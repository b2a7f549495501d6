"""``minillm-check --device``: will a run work on this machine? A self-test of every path a run here would take.

It builds a tiny tokenizer, a tiny student and a tiny teacher (random Llama models) and a small instruction set in a
scratch folder, then exercises, on the device a run would use:

* decoding with early EOS (rows that stop long before ``max_new_tokens``, the case sparse stop checks get wrong):
  eager with a dynamic cache, with a static cache, and compiled (CUDA graphs); every sampled response is re-scored
  by one teacher-forced forward, which must give the log-probs the decoder reported (a stale cache, stale weights
  or a wrong position shows up here);
* the bf16 sampling copy: equal to the cast weights, and decoding from it follows an in-place refresh;
* bf16 and fp16 autocast forwards against fp32;
* the chunked and fused losses against the plain ones (values and gradients), in fp32 and under autocast;
* one short MiniLLM run (rollouts, scoring, PPO steps, the PT loss, dev Rouge-L) and an exact resume from its
  checkpoint;
* with two or more visible GPUs (or ``--distributed`` on a CPU), the same run on 2 ranks under DeepSpeed ZeRO-3 with
  sampling on.

Each path ends ``ok``, ``fell back`` (an optional speed-up failed and the run continued on the plain path: it works,
more slowly; the warning says which switch), ``failed`` (with the error) or ``skipped`` (with why: a CUDA-only path on
a CPU, say). Importable: :func:`run_device_checks` returns the rows, :func:`format_table` prints them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

OK, FELL_BACK, FAILED, SKIPPED = "ok", "fell back", "failed", "skipped"
EOS, PAD = "</s>", "<pad>"
WORDS = ("cat dog bird fish tree book lamp cup door ship star moon rain wind fire stone bread milk road hill "
         "red blue green white black one two three four five").split()


@dataclass
class CheckResult:
    """One row of the table: a path, what happened on it and how long it took."""

    name: str
    status: str  # ok | fell back | failed | skipped
    detail: str = ""
    seconds: float = 0.0


class _Skip(Exception):
    """Raised by a check that does not apply on this machine; the message says why."""


class _Warnings(logging.Handler):
    """Collects the warnings a check emits (library log records and Python warnings): an optional speed-up that
    failed logs one, which turns an ``ok`` into ``fell back``."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# What the optional speed-ups say when they give up (minillm.generation.engine, LocalStrategy.sampling_model): the
# switch they name, or how decoding continues.
FALLBACK_WORDS = ("fall back", "falls back", "falling back", "fell back", "eagerly", "with the model itself",
                  "rollout.cuda_graphs", "rollout.static_cache", "strategy.sampling_copy")


def _is_fallback(message: str) -> bool:
    return any(w in message.lower() for w in FALLBACK_WORDS)


# ------------------------------------------------------------------------------------------------ scratch assets
def _records(rng: random.Random, count: int) -> list[dict]:
    tasks = [("Repeat the words.", lambda w: " ".join(w)), ("Reverse the order of the words.",
                                                           lambda w: " ".join(reversed(w))),
             ("Give the first word.", lambda w: w[0])]
    out = []
    for _ in range(count):
        instruction, answer = rng.choice(tasks)
        words = rng.sample(WORDS, 3)
        out.append({"instruction": instruction, "input": " ".join(words), "output": answer(words)})
    return out


def build_workspace(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write a tiny BPE tokenizer, a student and a teacher (random Llama, untied heads) and instruction/pre-training
    data under ``root``. Returns their paths. Takes about a second on a CPU."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    train, dev = _records(rng, 64), _records(rng, 16)
    pretrain = [" ".join(rng.choices(WORDS, k=12)) + "." for _ in range(64)]
    for name, rows in (("train.jsonl", train), ("dev.jsonl", dev)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "pretrain.txt").write_text("\n".join(pretrain) + "\n")

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    texts = [json.dumps(r) for r in train + dev] + pretrain + [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        " ### Instruction: ### Input: ### Response:"]
    core.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=1024, special_tokens=[EOS, PAD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                        model_max_length=512, clean_up_tokenization_spaces=False)
    paths = {"train": root / "train.jsonl", "dev": root / "dev.jsonl", "pretrain": root / "pretrain.txt"}
    shapes = {"student": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
              "teacher": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)}
    for i, (who, shape) in enumerate(shapes.items()):
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
                             num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
        torch.manual_seed(seed + i)
        model = LlamaForCausalLM(config).float()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(root / who, safe_serialization=True)
        tokenizer.save_pretrained(root / who)
        paths[who] = root / who
    return paths


def _load(path: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


# ------------------------------------------------------------------------------------------------ decoding checks
def _prompts(paths: dict[str, Path], device: torch.device, rows: int) -> tuple[torch.Tensor, torch.Tensor, object]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["student"])
    tok.padding_side = "left"
    texts = [f"### Instruction: {' '.join(WORDS[i:i + 2 + i % 5])} ### Response:" for i in range(rows)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device), tok


def _early_eos(tok) -> list[int]:
    """EOS plus every fourth id: sampled rows stop after a few tokens, at different steps, long before the limit."""
    return sorted({tok.eos_token_id, *range(3, len(tok), 4)})


def _decode_and_rescore(student, teacher, ids, mask, tok, *, alpha: float, static: bool, graphs: bool,
                        tol: float, seed: int = 1, student_scorer=None) -> str:
    """Sample with the fast engine, then re-score every response with one teacher-forced forward per model
    (``student_scorer``, default ``student``: the model whose log-probs the student's should be)."""
    from .generation.engine import fast_mixed_sample
    from .generation.sampling import teacher_forced_logprobs

    device = ids.device
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = _early_eos(tok)
    out = fast_mixed_sample(student, teacher if alpha > 0 else None, ids, mask, max_new_tokens=40, alpha=alpha,
                            eos_token_id=eos, pad_token_id=tok.pad_token_id, generator=generator, score=True,
                            static_cache=static, cuda_graphs=graphs, vocab_size=len(tok))
    resp, keep = out.response_ids, out.response_mask
    lengths = keep.sum(1).long().tolist()
    if max(lengths) >= 40 or min(lengths) < 1:
        raise AssertionError(f"rows did not stop early at their EOS: lengths {lengths}")
    eos_set = torch.tensor(eos, device=device)
    for row, n in enumerate(lengths):  # each row ends at its first EOS: nothing before it is one, padding after
        is_eos = torch.isin(resp[row, :n], eos_set)
        if not bool(is_eos[-1]) or bool(is_eos[:-1].any()):
            raise AssertionError(f"row {row} does not end at its first EOS (length {n})")
    worst = 0.0
    for name, model, reported in (("student", student_scorer or student, out.student_logprobs),
                                  ("teacher", teacher, out.teacher_logprobs if alpha > 0 else None)):
        if reported is None:
            continue
        scored = teacher_forced_logprobs(model, ids, mask, resp, keep)
        diff = float(((scored - reported) * keep).abs().max())
        worst = max(worst, diff)
        if not diff <= tol:
            raise AssertionError(f"{name} log-probs reported while decoding differ from a teacher-forced re-score "
                                 f"by {diff:.3g} (> {tol}): the decoder's cache, positions or weights are wrong")
    return f"lengths {min(lengths)}-{max(lengths)} of 40, |Δ log-prob| ≤ {worst:.1e}"


def _check_decode(paths, device, *, static: bool, graphs: bool) -> Callable[[], str]:
    def run() -> str:
        student, teacher = _load(paths["student"], device), _load(paths["teacher"], device)
        details = []
        for rows, alpha in ((4, 0.0), (6, 0.3), (4, 0.3)):  # batches of different sizes share compiled steps
            ids, mask, tok = _prompts(paths, device, rows)
            details.append(_decode_and_rescore(student, teacher, ids, mask, tok, alpha=alpha, static=static,
                                               graphs=graphs, tol=2e-3))
        return details[-1] + f"; {len(details)} batches"
    return run


def _check_sampling_copy(paths, device) -> str:
    """The bf16 decoding copy equals the cast weights, and decoding from it follows an in-place refresh."""
    import copy as copying

    from .strategy import HalfPrecisionCopy

    student = _load(paths["student"], device)
    copy = HalfPrecisionCopy(student, torch.bfloat16)
    module = copy.refresh()
    for (name, half), full in zip(module.named_parameters(), student.parameters()):
        if not torch.equal(half, full.detach().to(torch.bfloat16)):
            raise AssertionError(f"sampling copy parameter {name} differs from the cast weight")
    ids, mask, tok = _prompts(paths, device, 4)
    cuda = device.type == "cuda"
    first = _decode_and_rescore(module, None, ids, mask, tok, alpha=0.0, static=cuda, graphs=cuda, tol=0.1,
                                student_scorer=copying.deepcopy(student).to(torch.bfloat16))
    with torch.no_grad():  # a training step's worth of change, then a refresh: the copy's storage must not move
        pointers = [p.data_ptr() for p in module.parameters()]
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator(device=device).manual_seed(3), device=device)
                   * 0.05)
    copy.refresh()
    if [p.data_ptr() for p in module.parameters()] != pointers:
        raise AssertionError("refresh moved the sampling copy's parameter storage (captured graphs would go stale)")
    # decoding after the refresh must score like the *new* weights, cast independently of the copy (a replay of
    # stale weights would not)
    second = _decode_and_rescore(module, None, ids, mask, tok, alpha=0.0, static=cuda, graphs=cuda, tol=0.1, seed=2,
                                 student_scorer=copying.deepcopy(student).to(torch.bfloat16))
    return f"before refresh: {first}; after: {second}"


def _check_autocast(paths, device, dtype: torch.dtype) -> str:
    student = _load(paths["student"], device)
    ids, mask, _ = _prompts(paths, device, 4)
    with torch.no_grad():
        ref = torch.log_softmax(student(input_ids=ids, attention_mask=mask).logits.float(), -1)
        try:
            with torch.autocast(device.type, dtype=dtype):
                half = student(input_ids=ids, attention_mask=mask).logits
        except RuntimeError as e:  # e.g. an autocast dtype this device type does not support
            raise _Skip(f"autocast {dtype} is not supported on {device.type}: {e}") from e
    half = torch.log_softmax(half.float(), -1)
    diff = float((half - ref)[mask.bool()].abs().max())
    if not torch.isfinite(half).all() or diff > 0.15:
        raise AssertionError(f"{dtype} autocast log-probs differ from fp32 by {diff:.3g}")
    return f"|Δ log-prob| vs fp32 ≤ {diff:.1e}"


def _check_chunked_losses(device, dtype: torch.dtype | None) -> str:
    """Chunked (fused and checkpointed) single-step KL and PT loss against the plain losses: values and gradients."""
    from .losses import chunked as chunked_losses
    from . import losses

    gen = torch.Generator(device=device).manual_seed(0)
    b, length, h, ht, v = 3, 7, 16, 24, 97
    s_hidden = torch.randn(b, length, h, generator=gen, device=device)
    t_hidden = torch.randn(b, length, ht, generator=gen, device=device)
    s_head = torch.nn.Linear(h, v, bias=False).to(device)
    t_head = torch.nn.Linear(ht, v, bias=False).to(device)
    mask = (torch.rand(b, length, generator=gen, device=device) > 0.3).float()
    labels = torch.randint(0, v, (b, length), generator=gen, device=device).masked_fill(mask == 0, -100)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    tol = 2e-4 if dtype is None else 5e-2

    def grads(loss_fn):
        hidden = s_hidden.clone().requires_grad_(True)
        s_head.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(hidden)
        loss.float().backward()
        return loss.detach().float(), hidden.grad.float(), s_head.weight.grad.float()

    cases = {
        "single_step_kl": (lambda x: losses.single_step_kl(s_head(x), t_head(t_hidden), mask),
                           lambda x, fused: chunked_losses.chunked_single_step_kl(
                               x, s_head, mask, teacher_hidden=t_hidden, teacher_head=t_head, chunk_size=5,
                               fused=fused)),
        "pt_loss": (lambda x: losses.pt_loss(s_head(x), labels, t_head(t_hidden)),
                    lambda x, fused: chunked_losses.chunked_pt_loss(x, s_head, labels, teacher_hidden=t_hidden,
                                                                    teacher_head=t_head, chunk_size=5, fused=fused)),
    }
    worst = 0.0
    for name, (plain, chunked) in cases.items():
        ref = grads(plain)
        for fused in (True, False):
            got = grads(lambda x: chunked(x, fused))
            for what, a, r in zip(("loss", "d hidden", "d head"), got, ref):
                if not torch.isfinite(a).all():
                    raise AssertionError(f"{name} (fused={fused}): non-finite {what}")
                diff = float((a - r).abs().max() / r.abs().max().clamp(min=1e-12))
                worst = max(worst, diff)
                if diff > tol:
                    raise AssertionError(f"{name} (fused={fused}): {what} differs from the plain loss by {diff:.3g} "
                                         f"(relative, > {tol})")
    return f"relative |Δ| ≤ {worst:.1e} (values and gradients, fused and checkpointed)"


# ------------------------------------------------------------------------------------------------ training checks
def _run_config(paths, out: Path, device: torch.device, *extra: str):
    from .config import load_config

    precision = "bf16" if device.type == "cuda" else "fp32"
    overrides = [
        "method=minillm", f"output_dir={out}", f"student.path={paths['student']}", f"teacher.path={paths['teacher']}",
        f"student.dtype={precision}", f"teacher.dtype={precision}", f"data.train={paths['train']}",
        f"data.dev={paths['dev']}", f"data.pretrain={paths['pretrain']}", "data.max_prompt_length=160",
        "data.max_length=192", "data.pretrain_seq_length=32", "train.max_steps=2", "train.micro_batch_size=4",
        "train.global_batch_size=4", "train.eval_interval=2", "train.save_interval=1", "train.select_best_by=rougeL",
        "rollout.num_rollouts=8", "rollout.chunk_size=4", "rollout.max_new_tokens=16", "rollout.teacher_mix_alpha=0.2",
        "minillm.ppo_epochs=1", "eval.batch_size=8", "eval.max_new_tokens=16", "eval.num_prompts=8",
        "logging.log_interval=1", "logging.progress_bar=false", "strategy.backend=local",
        f"strategy.device={device.type}", *extra]
    return load_config(None, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))


def _final_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _check_minillm_run(paths, device, scratch: Path) -> str:
    from .cli.train import run

    out = scratch / "minillm-run"
    run(_run_config(paths, out, device))
    rows = _metrics(out)
    losses = [r[k] for r in rows for k in r if k.startswith("train/") and "loss" in k]
    if not losses or not all(isinstance(x, (int, float)) and x == x and abs(x) != float("inf") for x in losses):
        raise AssertionError(f"no finite training loss logged in {out / 'metrics.jsonl'}")
    rouge = [r[k] for r in rows for k in r if k.endswith("rougeL")]
    if not rouge:
        raise AssertionError("no dev Rouge-L logged")
    if not (out / "final").is_dir() or not (out / "checkpoints" / "step-1").is_dir():
        raise AssertionError(f"{out}: missing final/ or checkpoints/step-1/")
    return f"{len(losses)} finite losses, dev Rouge-L {rouge[-1]:.2f}"


def _check_resume(paths, device, scratch: Path) -> str:
    """Resume from the first run's step-1 checkpoint: the final weights must match the uninterrupted run's."""
    import shutil

    from .cli.train import run

    done = scratch / "minillm-run"
    if not (done / "final").is_dir():
        raise _Skip("needs the MiniLLM run's output, which failed")
    out = scratch / "minillm-resume"
    shutil.copytree(done, out)
    for gone in ("final", "best", "checkpoints/step-2"):
        shutil.rmtree(out / gone, ignore_errors=True)
    run(_run_config(paths, out, device), resume=str(out / "checkpoints" / "step-1"))
    a, b = _final_weights(done / "final"), _final_weights(out / "final")
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    # bitwise on a CPU; GPU kernels may pick other algorithms for the same shapes, so allow rounding there
    if worst > (0.0 if device.type == "cpu" else 1e-3):
        raise AssertionError(f"resumed run's final weights differ from the uninterrupted run's by {worst:.3g}")
    return f"final weights max |Δ| = {worst:.1e}"


def _check_zero3(paths, device, scratch: Path) -> str:
    """Two ranks under DeepSpeed ZeRO-3 with sampling on (the path that hung), in a bounded subprocess."""
    out = scratch / "zero3-run"
    cfg = _run_config(paths, out, device)
    from .config import to_yaml

    (scratch / "zero3.yaml").write_text(to_yaml(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if device.type == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "minillm.cli.train", "--config", str(scratch / "zero3.yaml"), "strategy.backend=deepspeed",
           "strategy.zero_stage=3", "rollout.do_sample=true", "train.global_batch_size=8", "rollout.num_rollouts=8"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        raise AssertionError("2-rank ZeRO-3 run did not finish in 240 s (a collective hang?)") from e
    if proc.returncode != 0:
        raise AssertionError(f"2-rank ZeRO-3 run exited {proc.returncode}: {proc.stderr.strip()[-600:]}")
    steps = [r["step"] for r in _metrics(out)]
    return f"2 ranks, steps logged {sorted(set(steps))}"


# ------------------------------------------------------------------------------------------------ driver
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("minillm-check: --device-type cuda but torch sees no CUDA device "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    return device


def run_device_checks(device: str | torch.device = "auto", *, scratch: str | Path | None = None,
                      compiled_on_cpu: bool = False, distributed: bool | None = None,
                      report: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
    """Run every check for ``device`` and return one :class:`CheckResult` per path.

    ``compiled_on_cpu`` also runs the compiled decode on a CPU (torch.compile without graphs; slow). ``distributed``:
    None runs the 2-rank ZeRO-3 check when two or more GPUs are visible, True forces it (2 gloo ranks on a CPU).
    ``report`` is called with each row as it finishes."""
    device = pick_device(device) if isinstance(device, str) else device
    cuda = device.type == "cuda"
    if distributed is None:
        distributed = cuda and torch.cuda.device_count() >= 2
    holder = tempfile.TemporaryDirectory(prefix="minillm-check-") if scratch is None else None
    root = Path(holder.name if holder is not None else scratch)
    results: list[CheckResult] = []
    try:
        paths = build_workspace(root / "assets")
        checks: list[tuple[str, Callable[[], str] | str]] = [
            ("decode: eager, dynamic cache, early EOS", _check_decode(paths, device, static=False, graphs=False)),
            ("decode: static cache", _check_decode(paths, device, static=True, graphs=False)),
            ("decode: compiled steps (CUDA graphs)",
             _check_decode(paths, device, static=True, graphs=True) if cuda or compiled_on_cpu
             else "CUDA only (--compiled-on-cpu runs it through torch.compile on the CPU)"),
            ("sampling copy (bf16), refresh", lambda: _check_sampling_copy(paths, device)),
            ("autocast bf16", lambda: _check_autocast(paths, device, torch.bfloat16)),
            ("autocast fp16", lambda: _check_autocast(paths, device, torch.float16)),
            ("chunked + fused losses, fp32", lambda: _check_chunked_losses(device, None)),
            ("chunked + fused losses, bf16 autocast", lambda: _check_chunked_losses(device, torch.bfloat16)),
            ("MiniLLM run: rollouts, PPO, PT, dev Rouge-L", lambda: _check_minillm_run(paths, device, root)),
            ("checkpoint save + exact resume", lambda: _check_resume(paths, device, root)),
            ("2 ranks, DeepSpeed ZeRO-3, sampling",
             (lambda: _check_zero3(paths, device, root)) if distributed
             else "needs 2 visible GPUs (--distributed runs it on 2 CPU ranks)"),
        ]
        for name, check in checks:
            result = _run_one(name, check)
            results.append(result)
            if report is not None:
                report(result)
    finally:
        if holder is not None:
            holder.cleanup()
    return results


def _run_one(name: str, check: Callable[[], str] | str) -> CheckResult:
    if isinstance(check, str):
        return CheckResult(name, SKIPPED, check)
    handler = _Warnings()
    logger = logging.getLogger("minillm")
    logger.addHandler(handler)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            detail = check()
        fallbacks = [m for m in handler.messages + [str(w.message) for w in caught] if _is_fallback(m)]
        status = FELL_BACK if fallbacks else OK
        if fallbacks:
            detail = fallbacks[0]
    except _Skip as e:
        status, detail = SKIPPED, str(e)
    except Exception as e:  # noqa: BLE001 — every failure becomes a row; the table is the point
        status = FAILED
        frames = traceback.extract_tb(e.__traceback__)
        where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
        detail = f"{type(e).__name__}: {e}{where}"
    finally:
        logger.removeHandler(handler)
    return CheckResult(name, status, detail, time.perf_counter() - start)


def format_table(results: list[CheckResult]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'path':<{width}}  {'status':<9}  {'time':>6}  detail", "-" * (width + 40)]
    for r in results:
        detail = r.detail.replace("\n", " ")
        lines.append(f"{r.name:<{width}}  {r.status:<9}  {r.seconds:5.1f}s  {detail[:300]}")
    return "\n".join(lines)
