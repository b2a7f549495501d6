"""The cross-field checks of the student-data (GKD/DistiLLM) and MiniLLM-objective settings, called by
:meth:`minillm.config.RunConfig.resolve` (``self`` is the RunConfig; ``fail(key, message)`` raises its ConfigError).
Kept apart so config.py stays a readable size; imports nothing of minillm.
"""

from __future__ import annotations

import os


def check_student_data(self, fail) -> None:
    """kd.on_policy_fraction / kd.adaptive_off_policy (GKD, DistiLLM): checks and the derived length."""
    k, d, t = self.kd, self.data, self.train
    if k.ptx_coef < 0:
        fail("kd.ptx_coef", f"must be >= 0, got {k.ptx_coef}")
    if k.ptx_coef > 0 and (d.pretrain is None or self.method == "minillm"):
        fail("kd.ptx_coef", "adds a language-modelling loss on data.pretrain to sft/kd/seqkd: set data.pretrain "
             "(MiniLLM's own PT loss is minillm.ptx_coef)")
    if not 0.0 <= k.on_policy_fraction <= 1.0:
        fail("kd.on_policy_fraction", f"must be in [0, 1], got {k.on_policy_fraction}")
    uses = k.on_policy_fraction > 0 or k.adaptive_off_policy
    if k.teacher_cache is not None:
        if self.method not in ("kd", "seqkd") or k.kd_ratio <= 0:
            fail("kd.teacher_cache", f"is read by the KD term of methods kd and seqkd with kd.kd_ratio > 0 (here "
                 f"method `{self.method}`, kd_ratio {k.kd_ratio}); for MiniLLM's PT loss use "
                 "minillm.pt_teacher_cache")
    if uses and self.method not in ("kd", "seqkd"):
        fail("kd.on_policy_fraction" if k.on_policy_fraction > 0 else "kd.adaptive_off_policy",
             f"student-generated data is for methods kd and seqkd, not `{self.method}`")
    if k.on_policy_fraction > 0 and k.adaptive_off_policy:
        fail("kd.adaptive_off_policy", "and kd.on_policy_fraction > 0 are two different schedules; pick one")
    if k.adaptive_off_policy:
        for key, value in (("adaptive_init", k.adaptive_init), ("adaptive_step", k.adaptive_step)):
            if not 0.0 <= value <= 1.0:
                fail(f"kd.{key}", f"must be in [0, 1], got {value}")
        if k.adaptive_loss_eps < 0:
            fail("kd.adaptive_loss_eps", "must be >= 0")
        if k.replay_capacity < t.micro_batch_size:
            fail("kd.replay_capacity", f"{k.replay_capacity} is smaller than one micro-batch "
                 f"(train.micro_batch_size={t.micro_batch_size})")
        if t.eval_interval == 0:
            fail("kd.adaptive_off_policy", "raises its probability on dev-loss rises, but train.eval_interval=0 "
                 "never evaluates; set an eval interval")
    room = d.max_length - d.max_prompt_length
    if k.student_max_new_tokens == -1:
        k.student_max_new_tokens = room
    if not 1 <= k.student_max_new_tokens <= room:
        fail("kd.student_max_new_tokens", f"must be in [1, data.max_length - data.max_prompt_length = {room}] "
             f"(or -1), got {k.student_max_new_tokens}")
    if not k.student_temperature > 0:
        fail("kd.student_temperature", "must be positive")
    if k.student_top_k < 0 or not 0.0 < k.student_top_p <= 1.0:
        fail("kd.student_top_k", "top_k must be >= 0 and student_top_p in (0, 1]")
    if uses and (k.student_top_k != 0 or k.student_top_p != 1.0):
        key = "kd.student_top_k" if k.student_top_k != 0 else "kd.student_top_p"
        fail(key, "on-policy KD (GKD/DistiLLM) learns on the student's own samples, but a top-k/top-p filter "
             "draws them from a truncated distribution that the divergence (taken over the whole vocabulary) "
             "never sees: the data would be off-policy by an amount nobody measures. Leave student_top_k=0 and "
             "student_top_p=1.0 (temperature is allowed)")

def check_minillm_objective(self, fail, world_size: int) -> None:
    """minillm.long_range / minillm.objective (the paper's alternatives): checks."""
    if self.method != "minillm":
        return
    m, r, t = self.minillm, self.rollout, self.train
    if m.objective in ("pg", "opd") and not (m.long_range or m.single_step):
        fail("minillm.long_range", f"and minillm.single_step are both false: the {m.objective} objective has no "
             "term left")
    if m.objective == "opd" and not 0.0 <= m.opd_gamma <= 1.0:
        fail("minillm.opd_gamma", f"must be in [0, 1], got {m.opd_gamma}")
    if m.objective == "ranking":
        if r.engine == "fast" and 0.0 < r.teacher_mix_alpha < 1.0:
            # the fast engine shares its per-step coins across a batch, so a pair's two samples would take their
            # teacher and student steps at the same positions: correlated, not two independent draws
            fail("rollout.teacher_mix_alpha", "ranking compares two independent samples of each prompt, but "
                 "the fast engine draws one coin per step for the whole batch, so both samples of a pair would "
                 "mix in the teacher at the same steps. Use rollout.engine=naive or speculative (independent "
                 "rows), or teacher_mix_alpha=0 (the slides' ablation)")
        if m.ranking_margin < 0 or m.ranking_anchor_coef < 0:
            fail("minillm.ranking_margin", "the margin and ranking_anchor_coef must be >= 0")
        if t.micro_batch_size % 2 or r.chunk_size % 2 or (r.num_rollouts // world_size) % 2:
            fail("minillm.objective", "ranking pairs two samples of each prompt: train.micro_batch_size, "
                 "rollout.chunk_size and the rollouts per rank must be even "
                 f"({t.micro_batch_size}, {r.chunk_size}, {r.num_rollouts // world_size})")


# ------------------------------------------------------------------------------ generic machinery


def parse_duration(text: str) -> float:
    """``"H:MM:SS"``, ``"MM:SS"``, ``"D-HH:MM:SS"`` (SLURM's forms) or plain seconds → seconds; ValueError if not."""
    text, days = str(text).strip(), 0
    if "-" in text:
        head, text = text.split("-", 1)
        days = int(head)
    parts = [float(p) for p in text.split(":")]
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or days < 0:
        raise ValueError(f"not a duration: {text!r}")
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + part
    return days * 86400 + seconds


def check_teachers(self, fail) -> None:
    """`teachers:` and `routing:` (multi-teacher routing, minillm.routing): names, references and exclusivity.
    By field, whether every training record has a route is checked when the data is loaded
    (minillm.routing.route_records); by file or dataset, every data.train source needs a route here."""
    teachers, routing = self.teachers, self.routing
    if not teachers:
        if routing != type(routing)():
            fail("routing", "routes records to `teachers:`, but no `teachers:` list is set")
        return
    if self.teacher.path:
        fail("teachers", "`teacher:` and `teachers:` are both set; use `teacher:` for one teacher, or list every "
             "teacher (with a name) under `teachers:` and remove `teacher:`")
    if self.method not in ("minillm", "kd", "seqkd"):
        fail("teachers", f"method `{self.method}` uses no teacher")
    if self.kd.teacher_cache is not None and self.method != "minillm":
        fail("kd.teacher_cache", "holds one teacher's distributions; with `teachers:` every teacher runs online")
    if self.kd.adaptive_off_policy and self.method != "minillm":
        fail("kd.adaptive_off_policy", "replays samples across steps, which would mix teachers within a step; "
             "with `teachers:` use kd.on_policy_fraction (GKD), whose samples are of the step's own prompts")
    names: list[str] = []
    for i, spec in enumerate(teachers):
        if not spec.name:
            fail(f"teachers[{i}].name", "every teacher needs a name (routes and metric keys refer to it)")
        if spec.name in names:
            fail(f"teachers[{i}].name", f"duplicate teacher name `{spec.name}`")
        if not spec.path:
            fail(f"teachers[{i}].path", f"teacher `{spec.name}` needs a path (hub id or local folder)")
        if spec.gradient_checkpointing:
            fail(f"teachers[{i}].gradient_checkpointing", "applies to the student only")
        names.append(spec.name)
    for value, name in routing.routes.items():
        if name not in names:
            fail(f"routing.routes.{value}", f"unknown teacher `{name}`; the teachers are {names}")
    for key in ("default", "pretrain_teacher"):
        name = getattr(routing, key)
        if name is not None and name not in names:
            fail(f"routing.{key}", f"unknown teacher `{name}`; the teachers are {names}")
    if routing.by == "field":
        if not routing.field:
            fail("routing.field", "must name the record field that picks the teacher")
        return
    # by file / dataset: every route names a data.train source, every source has a route (or routing.default)
    sources = {route_key(routing.by, s): s for s in train_sources(self.data.train)}
    for value in routing.routes:
        if route_key(routing.by, value) not in sources:
            fail(f"routing.routes.{value}", f"routes {routing.by} `{value}`, which is not in data.train "
                 f"{list(sources.values())}")
    routed = {route_key(routing.by, v) for v in routing.routes}
    for key, source in sources.items():
        if key not in routed and routing.default is None:
            fail("routing.routes", f"data.train source `{source}` has no route (routing.by={routing.by}) and there "
                 "is no routing.default; add it to routing.routes or set routing.default to a teacher name")


def train_sources(spec) -> list[str]:
    """data.train as a list of sources (one string, or a list of them)."""
    return [spec] if isinstance(spec, str) else list(spec)


def route_key(by: str, source: str) -> str:
    """What a data.train entry and a routing.routes key are compared by: by file, the normalised absolute path (so
    `./a.jsonl` and `a.jsonl` are one file); by dataset, the name as spelled (a named set or hub id)."""
    source = str(source)
    return os.path.normpath(os.path.abspath(os.path.expanduser(source))) if by == "file" else source


def check_train_sources(self, fail) -> None:
    """data.train: one source, or a non-empty list of distinct ones."""
    sources = train_sources(self.data.train)
    if not sources or not all(sources):
        fail("data.train", f"needs a source (a file, named set or hub id), or a list of them; got {self.data.train!r}")
    keys = [route_key("file", s) for s in sources]  # `a.jsonl` and `./a.jsonl` are one file
    for i, source in enumerate(sources):
        if keys[i] in keys[:i]:
            fail(f"data.train[{i}]", f"`{source}` is listed twice; its records would be trained on twice as often")


def check_teacher_server(self, fail) -> None:
    """teacher.server (minillm-teacher-serve): URLs, patience, and what a served teacher cannot do."""
    from urllib.parse import urlsplit

    if self.student.server is not None:
        fail("student.server", "a served model can only be the teacher; remove it")
    for i, spec in enumerate(self.teachers):
        if spec.server is not None:
            fail(f"teachers[{i}].server", "served teachers are not supported with `teachers:` yet; load every routed "
                 "teacher locally, or serve a single `teacher:`")
    t = self.teacher
    if t.server is None:
        return
    # ModelConfig keeps a list (it splits one comma-separated string); a string assigned later still counts as one URL
    urls = [t.server] if isinstance(t.server, str) else list(t.server)
    for i, url in enumerate(urls):
        key = f"teacher.server[{i}]" if len(urls) > 1 else "teacher.server"
        if not isinstance(url, str) or "," in url:
            fail(key, f"{url!r} is not one server URL; list entries are single http://host:port URLs")
        parts = urlsplit(url.strip())
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:  # a port that is not a number
            port_ok = False
        if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
            fail(key, f"`{url}` is not a server URL; write http://host:port (several: a list, or comma-separated)")
    if not urls:
        fail("teacher.server", "is empty; give http://host:port (or a list of them) or remove it")
    if not t.server_timeout > 0:
        fail("teacher.server_timeout", f"must be > 0 seconds, got {t.server_timeout}")
    if t.server_retries < 0:
        fail("teacher.server_retries", f"must be >= 0, got {t.server_retries}")
    r = self.rollout
    if self.method == "minillm" and r.teacher_mix_alpha > 0 and r.engine != "speculative":
        fail("rollout.teacher_mix_alpha", f"> 0 with teacher.server needs rollout.engine=speculative (the student "
             f"drafts, the served teacher verifies each round in one request on the full prefix); the {r.engine} "
             "engine runs the teacher token by token with a KV cache, which a served teacher does not keep. Set "
             "rollout.engine=speculative, rollout.teacher_mix_alpha=0, or load the teacher locally")
    if self.method == "minillm" and r.teacher_mix_alpha > 0 and not r.do_sample:
        fail("rollout.do_sample", "must be true with teacher.server and rollout.teacher_mix_alpha > 0: greedy "
             "teacher-mixed decoding needs the teacher's KV cache, which a served teacher does not keep")
