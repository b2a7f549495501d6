"""The measurements behind ``minillm-bench`` (:mod:`minillm.cli.bench`): one function per phase, one JSON dict.

Conventions: every timing synchronises the device before and after; "tokens" of a rollout are generated tokens
(B × new tokens, no EOS so every row runs to the end); of scoring/training, every position of [prompt; response]
the model processes. Limits: decoding is bounded by reading each model's weights once per forward (bytes/BW; KV
reads and the first, compute-bound prefill are ignored, so the fraction is an upper estimate); scoring and
training by 2·N·tokens (forward) and 6·N·tokens (forward+backward) FLOPs at the device's dense bf16 peak.
"""

from __future__ import annotations

import copy
import math
import platform
import resource
import time
from typing import Any, Callable

import torch

from ..losses import chunked as chunked_losses
from .. import losses
from ..losses.heads import response_hidden
from ..generation.engine import fast_mixed_sample
from ..generation.trace import NULL_TRACE
from .breakdown import CompileCounter, traced_rollout
from ..generation.rollout import response_logits
from ..generation.sampling import mixed_sample


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any, int | None]:
    """(median seconds over ``repeats`` calls after one untimed warm-up call, the last result, peak bytes
    allocated on CUDA or None). The warm-up keeps one-time costs (CUDA context, kernel selection, allocator
    growth) out of every measurement, so the path measured first is not penalised."""
    fn()
    times, out = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(max(1, repeats)):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], out, peak


def _device_info(device: torch.device, table: dict) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bandwidth, flops) in table.items():
            if key in name:
                return {"type": "cuda", "name": name, "peak_bandwidth_Bps": bandwidth, "peak_bf16_flops": flops}
        return {"type": "cuda", "name": name, "peak_bandwidth_Bps": None, "peak_bf16_flops": None,
                "note": "device not in the table: fractions of the limit are unknown"}
    return {"type": device.type, "name": platform.processor() or platform.machine(), "peak_bandwidth_Bps": None,
            "peak_bf16_flops": None, "note": "CPU: no known peak numbers, fractions of the limit are unknown"}


def measure_ceilings(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> dict:
    """The device's two ceilings measured in this process, since datasheet rates are only leads: memory bandwidth
    from a device-to-device copy much larger than any cache (bytes read + bytes written), and matrix FLOP/s from
    a square matmul in ``dtype`` (2·n³). Random data, never zeros (they can run faster than real data); median of
    ``repeats`` after a warm-up."""
    cuda = device.type == "cuda"
    elements = (1 << 30 if cuda else 1 << 26) // 4  # 1 GiB on CUDA, 64 MiB on a CPU, as fp32
    n = 8192 if cuda else 512
    g = torch.Generator(device=device).manual_seed(0)

    def copy_seconds() -> float:
        src = torch.rand(elements, device=device, generator=g)
        dst = torch.empty_like(src)
        return _timed(device, lambda: dst.copy_(src), repeats)[0]

    def matmul_seconds() -> float:
        a = torch.randn(n, n, device=device, generator=g).to(dtype)
        b = torch.randn(n, n, device=device, generator=g).to(dtype)
        return _timed(device, lambda: a @ b, repeats)[0]

    result = {"measured_bandwidth_Bps": 2 * elements * 4 / copy_seconds(),
              "measured_matmul_flops": 2 * n ** 3 / matmul_seconds(),
              "measured_with": f"copy of {elements * 4 >> 20} MiB (read + write); {n}x{n} {str(dtype)[6:]} matmul; "
                               f"median of {repeats}"}
    if cuda:
        torch.cuda.empty_cache()  # hand the buffers back before the models are built
    return result


def _build(shape: tuple[str, dict] | None, path: str | None, dtype: torch.dtype, device: torch.device, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    if path:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model_type, fields = shape
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _parse_extra_teachers(specs: list[str]) -> list[tuple[str, str]]:
    """``--extra-teacher NAME=SHAPE|PATH`` values → [(name, shape or path)], checked before anything is measured."""
    out = []
    for spec in specs or []:
        name, sep, what = spec.partition("=")
        if not sep or not name or not what or name == "teacher" or name in dict(out):
            raise ValueError(f"--extra-teacher {spec!r}: expected NAME=SHAPE or NAME=PATH with a new NAME (not "
                             "`teacher`, the main teacher's)")
        out.append((name, what))
    return out


def _extra_teachers(args, shapes: dict, dtype: torch.dtype, device: torch.device):
    """(name, model) of each ``--extra-teacher``, built one at a time (a shape name or an HF folder)."""
    for index, (name, what) in enumerate(_parse_extra_teachers(args.extra_teacher)):
        shape = shapes.get(what)
        yield name, _build(shape, None if shape else what, dtype, device, args.seed + 2 + index)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _fraction(limit_seconds: float | None, seconds: float) -> float | None:
    return None if limit_seconds is None else limit_seconds / seconds


def run_benchmark(args, shapes: dict, presets: dict, devices: dict) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    s_name, t_name, batch, prompt_len, new_tokens, train_batch = presets[args.preset]
    s_name, t_name = args.student or s_name, args.teacher or t_name
    batch, prompt_len = args.batch or batch, args.prompt_len or prompt_len
    new_tokens, train_batch = args.new_tokens or new_tokens, args.train_batch or train_batch
    info = _device_info(device, devices)
    _parse_extra_teachers(getattr(args, "extra_teacher", None))  # a malformed value fails before any timing
    if args.kl_only:  # only the head sizes and the vocabulary matter: no model is built
        return {"device": info, "dtype": str(dtype).replace("torch.", ""), "versions": _versions(),
                "setup": {"preset": args.preset, "student": args.student_path or s_name,
                          "teacher": args.teacher_path or t_name},
                "phases": {"single_step_kl_target": _kl_target(args, shapes, s_name, t_name, device, dtype)}}
    info.update(measure_ceilings(device, dtype))  # before the models take memory
    student = _build(shapes.get(s_name), args.student_path, dtype, device, args.seed)
    teacher = _build(shapes.get(t_name), args.teacher_path, dtype, device, args.seed + 1)
    vocab = min(student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    bandwidth, flops = info["peak_bandwidth_Bps"], info["peak_bf16_flops"]
    n_s, n_t = _params(student), _params(teacher)
    elem = torch.finfo(dtype).bits // 8
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(3, vocab, (batch, prompt_len), generator=g).to(device)
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[: batch // 2, : prompt_len // 4] = 0  # half the rows left-padded: the realistic layout
    common = dict(max_new_tokens=new_tokens, alpha=args.alpha, eos_token_id=None, pad_token_id=0)
    result: dict[str, Any] = {
        "device": info, "dtype": str(dtype).replace("torch.", ""),
        "versions": _versions(),
        "setup": {"preset": args.preset, "student": args.student_path or s_name, "teacher": args.teacher_path or t_name,
                  "student_params": n_s, "teacher_params": n_t, "batch": batch, "prompt_len": prompt_len,
                  "new_tokens": new_tokens, "train_batch": train_batch, "alpha": args.alpha,
                  "chunk_size": args.chunk_size, "repeats": args.repeats,
                  "timing": "median of `repeats` runs after one untimed warm-up"},
        "phases": {},
    }
    phases = result["phases"]
    if args.phase_only:
        phases["phase_measured"] = _measure_phase(args, student, teacher, dtype, batch, prompt_len, new_tokens,
                                                  train_batch)
        result["finite"] = all(math.isfinite(v["seconds"]) for v in phases["phase_measured"]["variants"].values())
        return result

    # ------------------------------------------------------------------ rollout
    def rollout_entry(seconds: float, peak, s_forwards: int, t_forwards: int) -> dict:
        weight_bytes = (s_forwards * n_s + t_forwards * n_t) * elem  # the floor: every weight read once per forward
        return {"seconds": seconds, "tokens_per_s": batch * new_tokens / seconds, "peak_memory_bytes": peak,
                "student_forwards": s_forwards, "teacher_forwards": t_forwards,
                "fraction_of_bandwidth_limit": _fraction(None if bandwidth is None else weight_bytes / bandwidth,
                                                         seconds),
                "fraction_of_measured_bandwidth": weight_bytes / info["measured_bandwidth_Bps"] / seconds}

    repeats = args.repeats

    def seeded() -> torch.Generator:  # every repeat draws the same coins and tokens
        return torch.Generator(device=device).manual_seed(args.seed)

    rollout: dict[str, Any] = {}
    if not args.skip_naive:
        secs, _, peak = _timed(device, lambda: mixed_sample(student, teacher, prompts, prompt_mask,
                                                            generator=seeded(), **common), repeats)
        rollout["naive"] = rollout_entry(secs, peak, new_tokens, new_tokens if args.alpha > 0 else 0)

    def hf_generate():  # the student alone through HF generate: the bar the fast teacher-mixed engine must beat
        with torch.no_grad():
            torch.manual_seed(args.seed)
            return student.generate(input_ids=prompts, attention_mask=prompt_mask, do_sample=True, top_k=0, top_p=1.0,
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    secs, _, peak = _timed(device, hf_generate, repeats)
    rollout["hf_generate_student_only"] = rollout_entry(secs, peak, new_tokens, 0)
    variants = [("fast_eager", dict(static_cache=False, cuda_graphs=False))]
    if device.type == "cuda" and not args.no_graphs:
        variants.append(("fast_cuda_graphs", dict(static_cache=True, cuda_graphs=True)))
    for name, options in variants:  # the warm-up call of _timed also compiles and captures the CUDA graphs
        def fast(trace=NULL_TRACE, options=options):
            return fast_mixed_sample(student, teacher, prompts, prompt_mask, generator=seeded(), score=False,
                                     trace=trace, **common, **options)

        counter = CompileCounter(fast)
        secs, out, peak = _timed(device, counter, repeats)
        rollout[name] = rollout_entry(secs, peak, out.student_forwards, out.teacher_forwards)
        rollout[name]["teacher_step_fraction"] = float(out.teacher_steps.float().mean())
        rollout[name]["breakdown"] = traced_rollout(device, fast, counter)  # after the timed calls: no cost to them
    if dtype != torch.float32:  # the local strategy's rollouts without strategy.sampling_copy: fp32 weights, autocast
        name, options = variants[-1]
        fp32_student = copy.deepcopy(student).float()

        def autocast_rollout():
            with torch.autocast(device.type, dtype=dtype):
                return fast_mixed_sample(fp32_student, teacher, prompts, prompt_mask, generator=seeded(), score=False,
                                         **common, **options)

        secs, out, peak = _timed(device, autocast_rollout, repeats)
        rollout["fast_fp32_student_autocast"] = rollout_entry(secs, peak, out.student_forwards, out.teacher_forwards)
        rollout["fast_fp32_student_autocast"]["sampling_copy_speedup"] = secs / rollout[name]["seconds"]
        del fp32_student
    # the engine with the student alone (alpha = 0): what minillm-eval --engine fast runs, against HF generate
    student_only = dict(common, alpha=0.0)
    graphs = device.type == "cuda" and not args.no_graphs
    def alone(trace=NULL_TRACE):
        return fast_mixed_sample(student, None, prompts, prompt_mask, generator=seeded(), score=False,
                                 static_cache=graphs, cuda_graphs=graphs, trace=trace, **student_only)

    counter = CompileCounter(alone)
    secs, out, peak = _timed(device, counter, repeats)
    rollout["fast_student_only"] = rollout_entry(secs, peak, out.student_forwards, 0)
    rollout["fast_student_only"]["cuda_graphs"] = graphs
    rollout["fast_student_only"]["breakdown"] = traced_rollout(device, alone, counter)
    if args.draft_tokens > 0:  # the speculative engine: independent rows, eager only
        from ..generation.speculative import speculative_mixed_sample

        secs, out, peak = _timed(device, lambda: speculative_mixed_sample(
            student, teacher, prompts, prompt_mask, generator=seeded(), score=False, draft_tokens=args.draft_tokens,
            static_cache=False, cuda_graphs=False, **common), repeats)
        rollout["speculative_eager"] = rollout_entry(secs, peak, out.student_forwards, out.teacher_forwards)
        rollout["speculative_eager"].update(draft_tokens=args.draft_tokens, rounds=out.rounds,
                                            acceptance=out.accepted_drafts / max(out.proposed_drafts, 1))
    fast_names = [k for k in rollout if k.startswith(("fast", "speculative"))
                  and k not in ("fast_student_only", "fast_fp32_student_autocast")]
    if "naive" in rollout:
        rollout["speedup_vs_naive"] = {k: rollout["naive"]["seconds"] / rollout[k]["seconds"] for k in fast_names}
    rollout["speedup_vs_hf_generate_student_only"] = {
        k: rollout["hf_generate_student_only"]["seconds"] / rollout[k]["seconds"]
        for k in [*fast_names, "fast_student_only"]}
    phases["rollout"] = rollout

    # ------------------------------------------------------------------ scoring, training, single-step KL
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    sample = fast_mixed_sample(student, teacher, prompts[:train_batch], prompt_mask[:train_batch], generator=gen,
                               score=False, **common)
    p_ids, p_mask, r_ids = prompts[:train_batch], prompt_mask[:train_batch], sample.response_ids
    r_mask = sample.response_mask
    positions = train_batch * (prompt_len + r_ids.shape[1])
    chunk = args.chunk_size
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dtype == torch.bfloat16 \
        and device.type == "cuda" else None

    def flops_entry(seconds: float, peak, n: int, factor: int) -> dict:
        work = factor * n * positions  # FLOPs: 2·N per token forward, 6·N forward + backward
        return {"seconds": seconds, "tokens_per_s": positions / seconds, "peak_memory_bytes": peak,
                "fraction_of_flop_limit": _fraction(None if flops is None else work / flops, seconds),
                "fraction_of_measured_matmul_flops": work / info["measured_matmul_flops"] / seconds}

    def score(chunked: bool, model=teacher):
        with torch.no_grad():
            if not chunked:
                return losses.token_logprobs(response_logits(model, p_ids, p_mask, r_ids, autocast), r_ids) * r_mask
            hidden, head = response_hidden(model, p_ids, p_mask, r_ids, autocast=autocast)
            return chunked_losses.chunked_token_logprobs(hidden, head, r_ids, r_mask, chunk_size=chunk)

    def scoring_of(model, n_params: int) -> dict:
        out = {}
        for name, chunked in (("plain", False), ("chunked", True)):
            secs, _, peak = _timed(device, lambda: score(chunked, model), repeats)
            out[name] = flops_entry(secs, peak, n_params, 2)
        return out

    scoring = scoring_of(teacher, n_t)
    phases["teacher_scoring"] = scoring
    if getattr(args, "extra_teacher", None):  # multi-teacher routing: each teacher scores the same rollouts
        per_teacher = {"teacher": scoring}
        for name, model in _extra_teachers(args, shapes, dtype, device):
            per_teacher[name] = {**scoring_of(model, _params(model)), "params": _params(model)}
            del model
        phases["teacher_scoring_per_teacher"] = per_teacher

    with torch.no_grad():  # the PPO term's constants: old log-probs (ratio ≈ 1) and unit advantages
        old_lp = losses.token_logprobs(response_logits(student, p_ids, p_mask, r_ids, autocast), r_ids) * r_mask
    advantages = torch.ones_like(old_lp)

    def train_step(chunked: bool):
        """The trainer's micro-step without the PT term: PPO term + single-step KL, student fwd+bwd, teacher fwd."""
        student.zero_grad(set_to_none=True)
        with torch.no_grad():
            if chunked:
                t_hidden, t_head = response_hidden(teacher, p_ids, p_mask, r_ids, autocast=autocast)
            else:
                t_logits = response_logits(teacher, p_ids, p_mask, r_ids, autocast)
        if chunked:
            hidden, head = response_hidden(student, p_ids, p_mask, r_ids, autocast=autocast)
            loss = chunked_losses.chunked_policy_loss(hidden, head, r_ids, r_mask, old_logprobs=old_lp,
                                                      advantages=advantages, teacher_hidden=t_hidden,
                                                      teacher_head=t_head, chunk_size=chunk).loss
        else:
            logits = response_logits(student, p_ids, p_mask, r_ids, autocast)
            lp = losses.token_logprobs(logits, r_ids) * r_mask
            loss = losses.ppo_clip_loss(lp, old_lp, advantages, r_mask) + losses.single_step_kl(logits, t_logits,
                                                                                                   r_mask)
        loss.backward()

    training = {}
    for name, chunked in (("plain", False), ("chunked", True)):
        secs, _, peak = _timed(device, lambda: train_step(chunked), repeats)
        training[name] = flops_entry(secs, peak, n_s, 6)
        training[name]["note"] = "student fwd+bwd + teacher fwd (FLOP limit counts the student only)"
    phases["training_step"] = training

    with torch.no_grad():
        s_hidden, s_head = response_hidden(student, p_ids, p_mask, r_ids, autocast=autocast)
        t_hidden, t_head = response_hidden(teacher, p_ids, p_mask, r_ids, autocast=autocast)
    s_hidden = s_hidden.detach().requires_grad_(True)

    def kl_step(variant: str):
        s_hidden.grad = None
        if variant != "plain":  # chunked: the default (fused) backward; chunked_checkpointed: heads rerun
            kl = chunked_losses.chunked_single_step_kl(s_hidden, s_head, r_mask, teacher_hidden=t_hidden,
                                               teacher_head=t_head, chunk_size=chunk, fused=variant == "chunked")
        else:
            with torch.no_grad():
                t_logits = t_head(t_hidden)
            kl = losses.single_step_kl(s_head(s_hidden), t_logits, r_mask)
        kl.backward()

    single = {}
    for name in ("plain", "chunked", "chunked_checkpointed"):
        secs, _, peak = _timed(device, lambda: kl_step(name), repeats)
        single[name] = {"seconds": secs, "tokens_per_s": positions / secs, "peak_memory_bytes": peak}
    phases["single_step_kl"] = single

    # ------------------------------------------------------------------ teacher reuse across PPO epochs
    def teacher_forward():
        with torch.no_grad():
            return response_hidden(teacher, p_ids, p_mask, r_ids, autocast=autocast)[0]

    secs, hidden, _ = _timed(device, teacher_forward, repeats)
    cached = hidden.to(torch.bfloat16)
    phases["teacher_reuse"] = {
        "teacher_forward_seconds_per_micro_batch": secs,
        "saved_seconds_per_phase_per_micro_batch_at_4_ppo_epochs": 4 * secs,
        "cached_hidden_bytes_per_micro_batch_bf16": cached.numel() * cached.element_size(),
        "cached_logits_bytes_per_micro_batch_bf16": r_ids.numel() * vocab * 2,
        "note": "the trainer keeps the teacher's last hidden states from scoring (minillm.reuse_teacher), replacing "
                "the per-micro-step teacher forward on rollouts by a head matmul per chunk",
    }

    # ------------------------------------------------------------------ one whole phase, composed from the above
    # A phase: `batch` rollouts, scored in micro-batches of `train_batch`, then `ppo_epochs` passes of training
    # micro-steps. Naive: teacher-every-step rollout, plain losses, the teacher re-run at every micro-step. Fast:
    # the fastest engine, chunked losses, and the teacher forward of each training micro-step replaced by the
    # reused hidden states. The PT loss (a corpus batch per micro-step) is the same in both and left out.
    micro = batch / train_batch
    fastest = min(fast_names, key=lambda k: rollout[k]["seconds"])
    fast_train = max(training["chunked"]["seconds"] - secs, 0.0)  # secs: one teacher forward per micro-batch
    phase_fast = rollout[fastest]["seconds"] + micro * (scoring["chunked"]["seconds"]
                                                        + args.ppo_epochs * fast_train)
    phase = {"rollouts": batch, "micro_batch": train_batch, "ppo_epochs": args.ppo_epochs,
             "fast_seconds": phase_fast, "fast_rollout_variant": fastest}
    if "naive" in rollout:
        naive_learn = scoring["plain"]["seconds"] + args.ppo_epochs * training["plain"]["seconds"]
        phase["naive_seconds"] = rollout["naive"]["seconds"] + micro * naive_learn
        phase["speedup"] = phase["naive_seconds"] / phase_fast
    phase["note"] = ("composed from the measured phases above (rollout + micro-batches x (scoring + ppo_epochs x "
                     "training step)); the PT loss is excluded from both")
    phases["phase_estimate"] = phase
    if args.kl_target:
        phases["single_step_kl_target"] = _kl_target(args, shapes, s_name, t_name, device, dtype)
    if args.phase:
        phases["phase_measured"] = _measure_phase(args, student, teacher, dtype, batch, prompt_len, new_tokens,
                                                  train_batch)
    if getattr(args, "served", False):  # minillm-teacher-serve: bytes per token, scoring colocated vs served
        from .served import measure_served

        scored = torch.cat([prompts[:train_batch], torch.randint(3, vocab, (min(train_batch, batch), new_tokens),
                                                                 generator=g).to(device)], 1)
        phases["teacher_served"] = measure_served(teacher, scored, repeats=args.repeats)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    result["process_max_rss_bytes"] = maxrss
    result["finite"] = all(math.isfinite(v["seconds"]) for p in ("teacher_scoring", "training_step")
                           for v in phases[p].values()) and math.isfinite(phase_fast)
    return result


def _versions() -> dict:
    return {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "python": platform.python_version()}


def _head_sizes(shape: tuple[str, dict] | None, path: str | None) -> tuple[int, int]:
    """(hidden size feeding the LM head, vocabulary) of a named shape or a checkpoint, from its config alone."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path) if path else AutoConfig.for_model(shape[0], **shape[1])
    config = config.get_text_config()
    hidden = getattr(config, "word_embed_proj_dim", None) or config.hidden_size  # OPT projects before its head
    return int(hidden), int(config.vocab_size)


def _kl_target(args, shapes, s_name, t_name, device, dtype) -> dict:
    """The single-step KL at ``--kl-target BxL`` with the models' head sizes (:mod:`minillm.bench.kl`)."""
    from .kl import measure_kl_target

    try:
        batch, length = (int(x) for x in (args.kl_target or "16x512").lower().split("x"))
    except ValueError:
        raise SystemExit(f"minillm-bench: --kl-target wants BATCHxLENGTH such as 16x512, got {args.kl_target!r}")
    s_hidden, s_vocab = _head_sizes(shapes.get(s_name), args.student_path)
    t_hidden, t_vocab = _head_sizes(shapes.get(t_name), args.teacher_path)
    return measure_kl_target(batch=batch, length=length, vocab=min(s_vocab, t_vocab), student_hidden=s_hidden,
                             teacher_hidden=t_hidden, chunk_size=args.chunk_size, device=str(device), dtype=dtype,
                             repeats=args.repeats, seed=args.seed)


def _measure_phase(args, student, teacher, dtype, batch, prompt_len, new_tokens, train_batch) -> dict:
    """One whole phase per configuration through the trainer (:mod:`minillm.bench.phase`). The models keep the
    bench's dtype: on CUDA the student trains in bf16 weights under bf16 autocast, the compute DeepSpeed's bf16
    mode does (its fp32 master weights live in the optimizer, which this leaves out)."""
    from .phase import PhaseSetup, measure_phases

    rollouts = args.phase_rollouts or 4 * batch
    setup = PhaseSetup(num_rollouts=rollouts, chunk_size=batch, micro_batch=train_batch, ppo_epochs=args.ppo_epochs,
                       prompt_len=prompt_len, new_tokens=new_tokens, alpha=args.alpha,
                       pt_seq_length=prompt_len + new_tokens + 1, loss_chunk_size=args.chunk_size,
                       precision="bf16" if dtype == torch.bfloat16 else "fp32", cuda_graphs=not args.no_graphs,
                       pt_cache_top_k=args.pt_cache_top_k, seed=args.seed)
    return measure_phases(student, teacher, setup, variants=tuple(args.phase_variants.split(",")))


__all__ = ["run_benchmark", "measure_ceilings"]
