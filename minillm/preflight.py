"""Pre-flight check of a run's teacher and student: will they distil into each other? (``minillm-check --config``)

Mismatched tokenizers, end-of-sequence tokens and chat templates break distillation silently in every peer framework:
the losses compare distributions over token ids, so two tokenizers that disagree on one id train the student towards
the wrong token. This module reads what it can without loading a weight (tokenizers, model configs, generation
configs, a sample of the run's own records) and reports one :class:`Finding` per problem, with the fix:

* vocabulary: the tokenizers' entries, and each model's output rows against the tokenizer (padded rows are fine);
* special tokens: EOS, PAD and BOS ids and strings in both tokenizers, and the EOS of both generation configs;
* tokenization: both tokenizers encode a sample of the run's prompts and responses to the same ids;
* chat template: both render a probe conversation identically (when ``data.template`` uses it);
* lengths: each model's maximum positions against ``data.max_length`` (and the rollout length);
* sampling: a teacher generation config whose temperature/top-k/top-p differ from the run's (which rule);
* logits: models that post-process their logits (soft-capping, scaling), and dtype advice.

``minillm-train`` runs the same checks before it loads a model and stops with exit code 2 on an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ERROR, WARNING, INFO = "error", "warning", "info"
SAMPLE_RECORDS = 64
# config attributes of families whose heads post-process the logits after the LM head's matmul
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logits_scaling", "logit_scale", "output_logit_scale")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclass
class Finding:
    """One result: ``severity`` (error | warning | info), the check it came from, what was found, how to fix it."""

    severity: str
    check: str
    message: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.severity:<7} {self.check}: {self.message}" + (f" Fix: {self.fix}" if self.fix else "")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _model_config(model_cfg):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code,
                                      revision=model_cfg.revision)


def _generation_config(model_cfg):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_cfg.path, revision=model_cfg.revision)
    except (OSError, ValueError):  # many checkpoints ship none: nothing to compare
        return None


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}


def _token(tok, attr: str) -> tuple[str | None, int | None]:
    return getattr(tok, f"{attr}_token", None), getattr(tok, f"{attr}_token_id", None)


def check_vocabulary(student_tok, teacher_tok, student_config, teacher_config) -> list[Finding]:
    out: list[Finding] = []
    if teacher_tok is not None:
        s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
        if s_vocab != t_vocab:
            differ = sorted({k for k in set(s_vocab) | set(t_vocab) if s_vocab.get(k) != t_vocab.get(k)},
                            key=lambda k: min(s_vocab.get(k, 1 << 40), t_vocab.get(k, 1 << 40)))
            shown = ", ".join(f"{k!r}: student {s_vocab.get(k)} / teacher {t_vocab.get(k)}" for k in differ[:3])
            out.append(Finding(ERROR, "vocabulary", f"the tokenizers differ ({len(s_vocab)} vs {len(t_vocab)} "
                               f"entries; {len(differ)} tokens map to different ids, e.g. {shown})",
                               "distil between models of one tokenizer family, or point teacher.tokenizer and "
                               "student.tokenizer at the same tokenizer"))
    for who, config in (("student", student_config), ("teacher", teacher_config)):
        if config is None:
            continue
        rows = getattr(_text_config(config), "vocab_size", None)
        size = len(student_tok)
        if rows is None:
            continue
        if rows < size:
            out.append(Finding(ERROR, "vocabulary", f"the {who} has {rows} output rows but the tokenizer has {size} "
                               "tokens: some tokens have no logit", f"resize the {who}'s embeddings to at least "
                               f"{size} (model.resize_token_embeddings) and save it"))
        elif rows > size:
            out.append(Finding(INFO, "vocabulary", f"the {who} has {rows} output rows for {size} tokens (padded "
                               f"embedding rows); losses and sampling use the first {size}"))
    return out


def check_special_tokens(student_tok, teacher_tok, student_gen, teacher_gen) -> list[Finding]:
    out: list[Finding] = []
    if teacher_tok is not None:
        for attr, severity in (("eos", ERROR), ("bos", WARNING), ("pad", INFO)):
            s, t = _token(student_tok, attr), _token(teacher_tok, attr)
            if s != t:
                why = {"eos": "rollouts, SFT targets and the teacher's scores end at EOS: the teacher would score the "
                              "student's end of sequence as an ordinary token",
                       "bos": "prompts may be encoded with different first tokens",
                       "pad": "padding is masked everywhere, so this only matters to code outside minillm"}[attr]
                out.append(Finding(severity, attr.upper(), f"student {attr} {s[0]!r} (id {s[1]}) but teacher "
                                   f"{attr} {t[0]!r} (id {t[1]}): {why}.",
                                   f"give both tokenizers the same {attr.upper()} token (save a tokenizer with "
                                   f"{attr}_token set and point teacher.tokenizer / student.tokenizer at it)"))
    eos = student_tok.eos_token_id
    for who, gen in (("student", student_gen), ("teacher", teacher_gen)):
        ids = _ids(getattr(gen, "eos_token_id", None)) if gen is not None else set()
        if ids and eos is not None and eos not in ids:
            out.append(Finding(WARNING, "EOS", f"the {who}'s generation_config.json ends generations at {sorted(ids)}, "
                               f"but the run's tokenizer EOS is {eos}: a chat model ending its turns with another "
                               "token would not stop where the run thinks it does",
                               "set the tokenizer's eos_token to the token the model ends its turns with"))
    return out


def check_tokenization(student_tok, teacher_tok, records, template: str) -> list[Finding]:
    if teacher_tok is None or not records:
        return []
    from .data.templates import render_prompt

    for record in records:
        try:
            texts = [render_prompt(record, student_tok, template)]
        except Exception as e:  # noqa: BLE001 — reported by the template check instead
            return [Finding(INFO, "tokenization", f"not compared: the prompt could not be rendered ({e})")]
        if record.references:
            texts.append(texts[0] + record.references[0])
        for text in texts:
            a = student_tok(text, add_special_tokens=False)["input_ids"]
            b = teacher_tok(text, add_special_tokens=False)["input_ids"]
            if a != b:
                at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                return [Finding(ERROR, "tokenization", f"{record.where}: the tokenizers encode the record "
                                f"differently from token {at} on (student {a[at:at + 4]}, teacher {b[at:at + 4]}), so "
                                "the teacher would score other tokens than the student's",
                                "use one tokenizer for both models (teacher.tokenizer / student.tokenizer)")]
    return [Finding(INFO, "tokenization", f"both tokenizers encode {len(records)} sampled records identically")]


def check_chat_template(student_tok, teacher_tok, template: str) -> list[Finding]:
    if template != "chat":
        return []
    probe = [{"role": "user", "content": "Name a colour."}]
    out: list[Finding] = []
    rendered = {}
    for who, tok in (("student", student_tok), ("teacher", teacher_tok)):
        if tok is None:
            continue
        if not getattr(tok, "chat_template", None):
            out.append(Finding(ERROR, "chat template", f"data.template=chat but the {who}'s tokenizer has no chat "
                               "template", "use data.template=reference for base models, or a tokenizer with one"))
            continue
        rendered[who] = tok.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    if len(rendered) == 2 and rendered["student"] != rendered["teacher"]:
        out.append(Finding(ERROR, "chat template", "student and teacher render a conversation differently "
                           f"(student {rendered['student']!r}, teacher {rendered['teacher']!r}): the teacher would "
                           "score prompts in a format it was not tuned on",
                           "give both the same chat template (tokenizer.chat_template), or use a shared tokenizer"))
    return out


def check_lengths(cfg, student_config, teacher_config) -> list[Finding]:
    out: list[Finding] = []
    need = cfg.data.max_length
    for who, config in (("student", student_config), ("teacher", teacher_config)):
        if config is None:
            continue
        text = _text_config(config)
        limit = next((getattr(text, k) for k in POSITION_KEYS if isinstance(getattr(text, k, None), int)), None)
        if limit is not None and limit < need:
            out.append(Finding(ERROR, "lengths", f"the {who} handles {limit} positions but data.max_length={need} "
                               f"(prompt + response{', rollouts included' if cfg.method == 'minillm' else ''})",
                               f"set data.max_length <= {limit} (and data.max_prompt_length below it)"))
    return out


def check_sampling(cfg, teacher_gen) -> list[Finding]:
    if teacher_gen is None or cfg.method != "minillm":
        return []
    r = cfg.rollout
    theirs = {"temperature": getattr(teacher_gen, "temperature", None), "top_k": getattr(teacher_gen, "top_k", None),
              "top_p": getattr(teacher_gen, "top_p", None)}
    ours = {"temperature": r.temperature, "top_k": r.top_k, "top_p": r.top_p}
    off = {k: v for k, v in theirs.items() if v is not None and v != ours[k] and getattr(teacher_gen, "do_sample", True)
           and not (k == "top_k" and v in (0, 50) and ours[k] == 0)}  # 50 is transformers' default, never read here
    if not off:
        return []
    return [Finding(WARNING, "sampling", f"the teacher's generation_config.json samples with "
                    f"{', '.join(f'{k}={v}' for k, v in off.items())}; this run samples rollouts with "
                    f"{', '.join(f'{k}={ours[k]}' for k in off)} (rollout.*), which is what MiniLLM scores: the "
                    "generation config is not used", "nothing, if the run's settings are what you want; else set "
                    "rollout.temperature")]


def check_logits_and_dtype(cfg, student_config, teacher_config, device_type: str) -> list[Finding]:
    from .models import teacher_precision_advice

    out: list[Finding] = []
    for who, config in (("student", student_config), ("teacher", teacher_config)):
        if config is None:
            continue
        text = _text_config(config)
        found = {k: getattr(text, k) for k in LOGIT_POSTPROCESSING if getattr(text, k, None) not in (None, 1, 1.0)}
        if found:
            out.append(Finding(WARNING, "logits", f"the {who} post-processes its logits after the LM head "
                               f"({', '.join(f'{k}={v}' for k, v in found.items())}); the chunked losses compute "
                               "logits from hidden states and check the first call against the model's own",
                               "if the first step reports a mismatch, set minillm.chunked_losses=false and "
                               "kd.chunked=false"))
    if cfg.method != "sft":
        advice = teacher_precision_advice(cfg.student.dtype, cfg.teacher.dtype, device_type, cfg.strategy.backend)
        if advice:
            out.append(Finding(WARNING, "dtype", advice))
    return out


def _records(cfg) -> tuple[list, Finding | None]:
    from .data.records import load_train_records

    try:
        records = load_train_records(cfg.data.train, cache_dir=cfg.data.cache_dir, response_field=cfg.data.response_field)
    except Exception as e:  # noqa: BLE001 — the run reports data errors itself; the check only samples
        return [], Finding(INFO, "tokenization", f"not compared: data.train could not be read here ({e})")
    step = max(1, len(records) // SAMPLE_RECORDS)
    return records[::step][:SAMPLE_RECORDS], None


def preflight(cfg, device_type: str | None = None) -> list[Finding]:
    """Every check for the resolved config ``cfg``, without loading a weight. ``device_type`` (for the dtype advice)
    defaults to where ``strategy.device`` would put the run."""
    import torch

    from .models import load_tokenizer

    if device_type is None:
        device_type = "cuda" if cfg.strategy.device == "cuda" or (
            cfg.strategy.device == "auto" and torch.cuda.is_available()) else "cpu"
    if cfg.teachers:  # multi-teacher routing: every teacher checked as `teacher:` would be, its name on each finding
        import dataclasses

        findings = []
        for spec in cfg.teachers:
            one = dataclasses.replace(cfg, teacher=spec, teachers=[])
            findings += [dataclasses.replace(f, message=f"teacher `{spec.name}`: {f.message}")
                         for f in preflight(one, device_type)]
        return findings
    findings: list[Finding] = []
    student_tok = load_tokenizer(cfg.student)
    needs_teacher = cfg.method != "sft" and bool(cfg.teacher.path)
    same_tokenizer = (cfg.teacher.tokenizer or cfg.teacher.path) == (cfg.student.tokenizer or cfg.student.path)
    teacher_tok = load_tokenizer(cfg.teacher) if needs_teacher and not same_tokenizer else None
    student_config = _model_config(cfg.student)
    teacher_config = _model_config(cfg.teacher) if needs_teacher else None
    student_gen = _generation_config(cfg.student)
    teacher_gen = _generation_config(cfg.teacher) if needs_teacher else None
    findings += check_vocabulary(student_tok, teacher_tok, student_config, teacher_config)
    findings += check_special_tokens(student_tok, teacher_tok, student_gen, teacher_gen)
    if teacher_tok is not None:
        records, problem = _records(cfg)
        findings += [problem] if problem else check_tokenization(student_tok, teacher_tok, records, cfg.data.template)
    findings += check_chat_template(student_tok, teacher_tok, cfg.data.template)
    findings += check_lengths(cfg, student_config, teacher_config)
    findings += check_sampling(cfg, teacher_gen)
    findings += check_logits_and_dtype(cfg, student_config, teacher_config, device_type)
    if needs_teacher and cfg.teacher.server is not None:
        findings += check_teacher_server(cfg, student_tok, teacher_config)
    return findings


def check_teacher_server(cfg, student_tok, teacher_config) -> list[Finding]:
    """teacher.server: each server's /v1/info against the student's tokenizer (fingerprints of the token → id map
    and EOS/BOS) and teacher.path's config, whose LM head the run applies to the served hidden states."""
    from .serve.client import TeacherClient, TeacherServerError, TeacherServerUnavailable
    from .serve.protocol import tokenizer_fingerprint

    t = cfg.teacher
    client = TeacherClient(t.server, timeout=min(t.server_timeout, 30.0), retries=min(t.server_retries, 2))
    text = _text_config(teacher_config)
    expected = {"model_type": getattr(text, "model_type", None), "hidden_size": getattr(text, "hidden_size", None),
                "num_hidden_layers": getattr(text, "num_hidden_layers", None)}
    out = []
    for url in client.urls:
        try:
            info = client.info(url)
        except (TeacherServerUnavailable, TeacherServerError) as error:
            out.append(Finding(ERROR, "teacher server", str(error), f"start `minillm-teacher-serve --model {t.path}` "
                               f"there, with the {'same ' if client.token else ''}MINILLM_TEACHER_TOKEN"))
            continue
        fix = f"serve teacher.path ({t.path}) with the student's tokenizer at {url}, or point teacher.path at the " \
              "served model"
        if info.get("tokenizer_sha256") != tokenizer_fingerprint(student_tok) or info.get("vocab_size") != len(
                student_tok):
            out.append(Finding(ERROR, "teacher server", f"{url} serves `{info.get('model')}` with another tokenizer "
                               f"than the student's ({info.get('vocab_size')} vs {len(student_tok)} tokens, "
                               "different token ids or EOS/BOS): its hidden states would score other tokens", fix))
        differ = [f"{k} {info.get(k)!r} vs {v!r}" for k, v in expected.items() if v is not None and info.get(k) != v]
        if t.revision and info.get("revision") not in (None, t.revision):
            differ.append(f"revision {info.get('revision')!r} vs {t.revision!r}")
        if differ:
            out.append(Finding(ERROR, "teacher server", f"{url} serves `{info.get('model')}`, not the model of "
                               f"teacher.path `{t.path}` ({'; '.join(differ)})", fix))
    return out


def has_errors(findings: list[Finding]) -> bool:
    return any(f.severity == ERROR for f in findings)
