"""Multi-teacher routing: each training record is supervised by one of ``teachers:`` (``routing:`` says which).

Design (why whole phases): under ZeRO-3 a teacher's forward all-gathers that teacher's shards, a collective, so
every rank must run the same teacher at the same moment; a batch that mixes teachers would also need each teacher's
hidden states and LM head in one chunked loss. So a *rollout phase* is homogeneous: phase k draws its prompts only
from the records routed to one teacher, chosen by :meth:`TeacherRouter.teacher_of_phase`, a pure function of
(seed, phase) that is the same on every rank. Sampling with teacher mix-in, rewards, the single-step KL and every
micro-batch and optimizer step of the phase then use that teacher. Over a run, a teacher gets phases in
proportion to its share of the training records. The PT/KD term on data.pretrain (and the dev metrics) use
``routing.pretrain_teacher``.

Exact resume: each teacher's prompt cursor (a :class:`ResumableSampler` over its records) and the per-teacher
counters are in :meth:`TeacherRouter.state_dict`; the phase number picks the teacher again.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import Subset

from .config import ConfigError
from .config_checks import route_key
from .data import ResumableSampler
from .data.records import DataError


def pretrain_teacher(cfg, teacher) -> tuple[Any, str, str | None]:
    """(model, path, name) of the teacher of the PT/KD term and the dev metrics. ``teacher``: the trainer's argument
    (one model, or name -> model with ``teachers:``, where it is routing.pretrain_teacher, else the first teacher)."""
    if not isinstance(teacher, dict):
        return teacher, cfg.teacher.path, None
    name = cfg.routing.pretrain_teacher or cfg.teachers[0].name
    return teacher[name], next(t.path for t in cfg.teachers if t.name == name), name


def route_records(records: Sequence[Any], routing, names: Sequence[str]) -> list[int]:
    """The teacher (index into ``names``) of each record, by ``routing``; a record without a route, or routed to
    an unknown teacher, is a :class:`DataError` naming its file, line and record index. By file or dataset, a
    record's route is its ``origin`` (the data.train entry it was read from)."""
    if routing.by in ("file", "dataset"):
        routes = {route_key(routing.by, k): v for k, v in routing.routes.items()}
        return [_route_by_source(i, record, routes, routing, names) for i, record in enumerate(records)]
    out = []
    for i, record in enumerate(records):
        fields = getattr(record, "fields", {}) or {}
        if routing.field in fields:
            value = fields[routing.field]
            name = routing.routes.get(value, routing.routes.get(str(value))) if routing.routes else value
            if name is None:
                raise DataError(f"{record.where} (record {i}): `{routing.field}` = {value!r} has no route; "
                                f"routing.routes maps {sorted(map(str, routing.routes))}")
        elif routing.default is not None:
            name = routing.default
        else:
            raise DataError(f"{record.where} (record {i}): no field `{routing.field}` to route it by (routing.field) "
                            "and no routing.default; add the field or set routing.default to a teacher name")
        if name not in names:
            raise DataError(f"{record.where} (record {i}): `{routing.field}` routes to `{name}`, which is not a "
                            f"teacher; the teachers are {list(names)}")
        out.append(list(names).index(name))
    return out


def _route_by_source(i: int, record, routes: dict, routing, names: Sequence[str]) -> int:
    name = routes.get(route_key(routing.by, record.origin), routing.default)
    if name is None:
        raise DataError(f"{record.where} (record {i}): its {routing.by} `{record.origin}` has no route in "
                        f"routing.routes ({sorted(map(str, routing.routes))}) and there is no routing.default")
    if name not in names:
        raise DataError(f"{record.where} (record {i}): {routing.by} `{record.origin}` routes to `{name}`, which is "
                        f"not a teacher; the teachers are {list(names)}")
    return list(names).index(name)


class TeacherRouter:
    """The per-teacher prompt subsets, cursors, phase schedule and counters of one rank.

    ``routes[i]``: the teacher index of training prompt ``i`` (a position in ``data.train_prompts``)."""

    def __init__(self, names: Sequence[str], models: Sequence[Any], routes: Sequence[int], *, seed: int, rank: int,
                 world_size: int, batch_size: int, unit: str):
        self.names, self.models, self.seed = list(names), list(models), int(seed)
        self.subsets = [[i for i, k in enumerate(routes) if k == t] for t in range(len(self.names))]
        for name, subset in zip(self.names, self.subsets):
            if len(subset) // world_size < batch_size:
                raise ConfigError(f"teacher `{name}` has {len(subset)} training records, fewer than {unit} needs "
                                  f"on {world_size} rank(s) ({world_size} x {batch_size}); route more records to it "
                                  "or lower the batch size")
        # a distinct stream per teacher, each the same on every rank (the rank only picks its share)
        self.samplers = [ResumableSampler(len(s), seed=self.seed + 7919 * (t + 1), rank=rank, world_size=world_size,
                                          shuffle=True, drop_last=True) for t, s in enumerate(self.subsets)]
        # on the host, like the CPU generator of the schedule draw
        self.weights = torch.tensor([float(len(s)) for s in self.subsets], dtype=torch.float64, device="cpu")
        # global (all-reduced) sums since the start of the run: response tokens and rollouts scored by each teacher
        self.routed_tokens = [0.0] * len(self.names)
        self.routed_rollouts = [0.0] * len(self.names)

    def teacher_of_phase(self, phase: int) -> int:
        """The teacher of rollout phase ``phase``: drawn with probability ∝ its number of records, from a CPU
        generator seeded by (seed, phase) alone, so every rank and every resumed run picks the same one."""
        g = torch.Generator(device="cpu")
        g.manual_seed(self.seed * 1_000_003 + 104_729 * int(phase) + 17)
        return int(torch.multinomial(self.weights, 1, generator=g))

    def prompt_set(self, prompts, teacher: int) -> Subset:
        return Subset(prompts, self.subsets[teacher])

    def record_phase(self, teacher: int, stats: dict[str, float], response_tokens: float,
                     rows: float) -> dict[str, float]:
        """Add a scored phase's global response tokens and rollouts to the counters; the teacher/<name>/* metrics
        (``stats``: the phase's rollout/* means over every rank)."""
        self.routed_tokens[teacher] += float(response_tokens)
        self.routed_rollouts[teacher] += float(rows)
        name = self.names[teacher]
        out = {f"teacher/{name}/{k}": stats[f"rollout/{k}"] for k in ("reward", "reverse_kl_k3", "teacher_logprob")}
        for t, other in enumerate(self.names):
            out[f"teacher/{other}/routed_tokens"] = self.routed_tokens[t]
            out[f"teacher/{other}/routed_rollouts"] = self.routed_rollouts[t]
        out["train/teacher_index"] = float(teacher)
        return out

    def record_step(self, teacher: int, local_tokens: float, rows: float, strategy) -> dict[str, float]:
        """kd/seqkd: add an optimizer step's response tokens (summed over ranks: a collective, run by every rank at
        every step) and rows to ``teacher``'s counters; the teacher/<name>/* counters to log."""
        tokens = torch.tensor([float(local_tokens)], dtype=torch.float64, device=strategy.device)
        strategy.all_reduce(tokens, "sum")
        self.routed_tokens[teacher] += float(tokens[0])
        self.routed_rollouts[teacher] += float(rows)
        out = {f"teacher/{n}/routed_tokens": self.routed_tokens[t] for t, n in enumerate(self.names)}
        out.update({f"teacher/{n}/routed_records": self.routed_rollouts[t] for t, n in enumerate(self.names)})
        return out

    def micro_batch(self, teacher: int, dataset, size: int, collate) -> dict[str, Any]:
        """``size`` items of ``dataset`` (indexed like data.train_prompts) routed to ``teacher``, in its sampler's
        order, wrapping into the sampler's next epoch when this one runs out."""
        sampler, subset, picked = self.samplers[teacher], self.subsets[teacher], []
        while len(picked) < size:
            for i in sampler:  # resumes at the sampler's position; each yielded index advances it
                picked.append(i)
                if len(picked) == size:
                    break
            else:
                sampler.set_epoch(sampler.epoch + 1)
        return collate([dataset[subset[i]] for i in picked])

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "samplers": [s.state_dict() for s in self.samplers],
                "routed_tokens": list(self.routed_tokens), "routed_rollouts": list(self.routed_rollouts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ConfigError(f"the checkpoint was written with teachers {state['names']}, this run has "
                              f"{self.names}: resume with the same `teachers:` list")
        for sampler, s in zip(self.samplers, state["samplers"]):
            sampler.load_state_dict(s)
        self.routed_tokens = [float(x) for x in state["routed_tokens"]]
        self.routed_rollouts = [float(x) for x in state["routed_rollouts"]]


def build_router(cfg, data, teachers: dict[str, Any], strategy) -> TeacherRouter:
    """The router of a run with ``teachers:`` (``teachers``: name -> prepared model, in config order). Method minillm
    routes rollout phases; kd/seqkd route optimizer steps (every micro-batch of a step from one teacher's records)."""
    names = [t.name for t in cfg.teachers]
    by_record = route_records(data.train_records, cfg.routing, names)
    routes = [by_record[i] for i in data.train_prompts.indices]  # prompt position -> its record's teacher
    return TeacherRouter(names, [teachers[n] for n in names], routes, seed=cfg.seed, rank=strategy.rank,
                         world_size=strategy.world_size, **(
                             dict(batch_size=cfg.rollout.chunk_size, unit="one generation batch (rollout.chunk_size)")
                             if cfg.method == "minillm" else
                             dict(batch_size=cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps,
                                  unit="one optimizer step (train.micro_batch_size x accumulation steps)")))


def dev_routes(cfg, records: Sequence[Any]) -> list[int]:
    """The teacher index of each dev record by ``cfg.routing``; -1 for a record without a route and no
    routing.default (e.g. a dev file without the routing field): it counts in dev/* but in no teacher's subset."""
    names = [t.name for t in cfg.teachers]
    out = []
    for record in records:
        try:
            out.append(route_records([record], cfg.routing, names)[0])
        except DataError:
            out.append(-1)
    return out


class DevPerTeacher:
    """Per-teacher dev metrics of the MiniLLM trainer: each teacher's k3 reverse-KL estimate and mean per-token
    log-prob of the student's dev samples, on the dev prompts routed to it. Every teacher with routed dev prompts
    scores every dev batch on every rank (under ZeRO-3 a teacher forward is a collective, so no rank may skip one);
    rows routed elsewhere are weighted 0. Keys: dev/teacher/<name>/{reverse_kl_k3,teacher_logprob,records}."""

    def __init__(self, router: TeacherRouter, routes: Sequence[int], device):
        self.router, self.routes = router, torch.tensor(list(routes) or [-1], dtype=torch.long, device="cpu")
        # teachers with dev prompts routed to them: the same on every rank (from all dev records), so skipping the
        # others' forwards keeps the ranks' collectives matched
        self.active = [k for k in range(len(router.names)) if bool((self.routes == k).any())]
        # per teacher: [Σ k3 per sequence, sequences, Σ teacher log-prob over tokens, tokens]
        self.sums = torch.zeros(len(router.names), 4, dtype=torch.float64, device=device)

    def add(self, index, weight, score) -> None:
        """One dev batch: ``index`` [B] its dev record indices, ``weight`` [B] 0 for padding repeats, ``score``:
        model -> [B, 4] per-row sums of that teacher (as the trainer's dev/* sums)."""
        routes = self.routes[index.cpu()].to(self.sums.device)
        for k in self.active:
            model = self.router.models[k]
            w = weight.to(self.sums) * (routes == k).to(self.sums)
            self.sums[k] += (score(model).to(self.sums) * w[:, None]).sum(0)

    def metrics(self, strategy) -> dict[str, float]:
        strategy.all_reduce(self.sums, "sum")
        out = {}
        for name, (k3, rows, logprob, tokens) in zip(self.router.names, self.sums.tolist()):
            if rows > 0:  # a teacher without routed dev prompts has no dev metrics
                out.update({f"dev/teacher/{name}/reverse_kl_k3": k3 / rows, f"dev/teacher/{name}/records": rows,
                            f"dev/teacher/{name}/teacher_logprob": logprob / max(tokens, 1.0)})
        return out
