#!/usr/bin/env python3
"""Planted-bug check: does the suite catch wrong training, not only broken parts?

Each entry of MUTATIONS plants one one-line bug in the trainers' wiring (a copy of the source tree, never the
checkout) and runs the tests that are *about that behaviour*. A mutation is killed when those tests fail. A
survivor means a wrong trainer would pass the suite: add or sharpen a test.

    python scripts/mutation_check.py              # all mutations, a table at the end (a few minutes on a CPU)
    python scripts/mutation_check.py --list       # what is planted where, and which tests must catch it
    python scripts/mutation_check.py reward-sign whitening     # some of them

Exit status 1 if any mutation survives (or no longer applies: the source changed and the entry needs updating).
tests/test_mutation_list.py checks in CI that every mutation still applies to the source exactly once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # file under the repository root
    original: str  # must occur exactly once
    mutated: str
    tests: tuple[str, ...]  # the tests about this behaviour; at least one must fail
    what: str


MUTATIONS = (
    # ---- MiniLLM: scoring (minillm/generation/rollout.py)
    Mutation("reward-sign", "minillm/generation/rollout.py",
             "rewards = losses.token_rewards(reward_teacher_lp, old,", "rewards = losses.token_rewards(old, reward_teacher_lp,",
             ("tests/test_reward_temperature.py", "tests/test_training_direction.py", "tests/test_trainer_oracle.py"),
             "reward = log q − log p instead of log p − log q"),
    Mutation("alpha-in-weights", "minillm/generation/rollout.py",
             "weights = losses.importance_weights(old, teacher_lp, mask, alpha)",
             "weights = losses.importance_weights(old, teacher_lp, mask, 0.0)",
             ("tests/test_reward_temperature.py",), "importance weights computed with α = 0 (all ones)"),
    Mutation("discounting", "minillm/generation/rollout.py",
             "returns = losses.long_range_advantages(rewards, mask, gamma=gamma,",
             "returns = losses.long_range_advantages(rewards, mask, gamma=1.0,",
             ("tests/test_reward_temperature.py",), "γ ignored in the long-range returns"),
    Mutation("length-norm", "minillm/generation/rollout.py",
             "length_norm=length_norm,\n", "length_norm=False,\n",
             ("tests/test_reward_temperature.py",), "length normalisation of the returns ignored"),
    # ---- MiniLLM: learning (minillm/trainers/minillm.py)
    Mutation("include-current", "minillm/trainers/minillm.py",
             "include_current=m.include_current)", "include_current=True)",
             ("tests/test_trainer_oracle.py",), "minillm.include_current ignored: r_t always counted in its own return"),
    Mutation("single-step-dropped-plain", "minillm/trainers/minillm.py",
             "            loss = loss + single\n", "            loss = loss\n",
             ("tests/test_trainer_oracle.py", "tests/test_loss_reference.py"),
             "single-step KL computed and logged but not optimised (plain path)"),
    Mutation("long-range-dropped-chunked", "minillm/trainers/minillm.py",
             "pg_coef=1.0 if m.long_range else 0.0,", "pg_coef=0.0,",
             ("tests/test_trainer_oracle.py", "tests/test_loss_reference.py"),
             "long-range PG term logged but not optimised (chunked path, the default)"),
    Mutation("whitening", "minillm/trainers/minillm.py",
             'advantages = losses.whiten(mb.returns, mask if m.whiten == "masked" else None, all_reduce=reduce)',
             "advantages = mb.returns", ("tests/test_loss_reference.py",), "advantages not whitened"),
    Mutation("ptx-coef", "minillm/trainers/minillm.py",
             "loss = loss + m.ptx_coef * pt", "loss = loss + pt",
             ("tests/test_loss_reference.py",), "minillm.ptx_coef ignored"),
    Mutation("pg-weights-plain", "minillm/trainers/minillm.py",
             "pg = losses.ppo_clip_loss(logprobs, mb.old_logprobs, advantages, mask, weights=mb.weights,",
             "pg = losses.ppo_clip_loss(logprobs, mb.old_logprobs, advantages, mask, weights=None,",
             ("tests/test_loss_reference.py",), "importance weights dropped from the PG term (plain path)"),
    Mutation("pg-weights-chunked", "minillm/trainers/minillm.py",
             "weights=mb.weights, clip_ratio=self._clip_ratio(), temperature=r.temperature,",
             "weights=None, clip_ratio=self._clip_ratio(), temperature=r.temperature,",
             ("tests/test_loss_reference.py",), "importance weights dropped (chunked path, the default)"),
    Mutation("clip-range", "minillm/trainers/minillm.py",
             "clip_ratio=self._clip_ratio())", "clip_ratio=self._clip_ratio() * 10)",
             ("tests/test_loss_reference.py",), "PPO clip range ten times wider (plain path)"),
    Mutation("single-step-temperature", "minillm/trainers/minillm.py",
             "single = losses.single_step_kl(logits, t_logits, mask, temperature=r.temperature,",
             "single = losses.single_step_kl(logits, t_logits, mask, temperature=1.0,",
             ("tests/test_loss_reference.py",), "single-step KL at T = 1 whatever rollout.temperature"),
    # ---- MiniLLM: dev evaluation (minillm/trainers/minillm.py)
    Mutation("dev-k3-args", "minillm/trainers/minillm.py",
             "losses.k3_reverse_kl(s_lp, t_lp, mask)", "losses.k3_reverse_kl(t_lp, s_lp, mask)",
             ("tests/test_trainer_oracle.py",), "dev/reverse_kl_k3 estimates KL(p‖q)'s k3 instead of KL(q‖p)'s"),
    Mutation("dev-teacher-scores-student", "minillm/trainers/minillm.py",
             "t_lp = teacher_forced_logprobs(self.pt_teacher, prompt_ids", "t_lp = teacher_forced_logprobs(self.student, prompt_ids",
             ("tests/test_trainer_oracle.py",), "dev metrics score the student's samples with the student, not the teacher"),
    # ---- minillm-generate (minillm/evaluation/teacher_samples.py)
    Mutation("generate-top-k", "minillm/evaluation/teacher_samples.py",
             "temperature=settings.temperature, top_k=settings.top_k,", "temperature=settings.temperature, top_k=0,",
             ("tests/test_generate_cli.py",), "minillm-generate ignores --top-k (samples the full distribution)"),
    # ---- SFT / KD (minillm/trainers/sft.py, minillm/data)
    Mutation("kd-ratio", "minillm/trainers/sft.py",
             "loss = (1.0 - kd.kd_ratio) * ce + kd.kd_ratio * kd_term", "loss = 0.5 * ce + 0.5 * kd_term",
             ("tests/test_kd_reference.py",), "kd.kd_ratio ignored (plain path)"),
    Mutation("kd-temperature", "minillm/trainers/sft.py",
             "kd_term = losses.pt_loss(logits / kd.temperature, labels, t_logits / kd.temperature, kd_ratio=1.0)",
             "kd_term = losses.pt_loss(logits, labels, t_logits, kd_ratio=1.0)",
             ("tests/test_kd_reference.py",), "kd.temperature ignored (plain path)"),
    Mutation("kd-temperature-chunked", "minillm/trainers/sft.py",
             "temperature=kd.temperature, beta=kd.beta, skew=kd.skew, **chunks,",
             "temperature=1.0, beta=kd.beta, skew=kd.skew, **chunks,",
             ("tests/test_kd_reference.py",), "kd.temperature ignored (chunked path, the default)"),
    Mutation("label-masking", "minillm/data/instruction.py",
             "labels[: max(prompt_length - 1, 0)] = IGNORE_INDEX", "labels[:0] = IGNORE_INDEX",
             ("tests/test_data.py",), "the prompt's tokens left in the SFT/KD loss"),
    # ---- the demo's student initialisation and greedy answers (minillm/demo)
    Mutation("influence-padding", "minillm/demo/models.py",
             "                count += int(valid.sum())\n", "                count += valid.numel()\n",
             ("tests/test_demo.py::test_block_influence_equals_one_minus_cosine_of_each_layers_input_and_output",),
             "block influence averaged over padding positions too"),
    Mutation("greedy-penalty-padding", "minillm/demo/greedy.py",
             "counts.scatter_add_(1, input_ids, valid.long())",
             "counts.scatter_add_(1, input_ids, torch.ones_like(input_ids))",
             ("tests/test_demo.py::test_plain_greedy_and_the_penalty_ignore_padding",),
             "the greedy repetition penalty counts left padding (pad = EOS) as tokens already seen"),
)


def check_applies(mutation: Mutation, root: Path = REPO) -> str | None:
    """None when ``mutation.original`` occurs exactly once in its file under ``root``, else why not."""
    path = root / mutation.path
    if not path.is_file():
        return f"{mutation.path} does not exist"
    count = path.read_text().count(mutation.original)
    return None if count == 1 else f"{mutation.path}: the original text occurs {count} times (expected once)"


def _copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".venv", ".git", "runs", ".cache", "__pycache__", "*.egg-info", ".pytest_cache")
    for name in ("minillm", "tests", "configs", "scripts"):
        shutil.copytree(REPO / name, dst / name, ignore=ignore)
    for name in ("pyproject.toml",):
        shutil.copy2(REPO / name, dst / name)


def run(mutation: Mutation, timeout: int) -> tuple[str, float, str]:
    """(killed | SURVIVED | not applicable | timeout, seconds, detail) for one mutation in a fresh copy."""
    problem = check_applies(mutation)
    if problem:
        return "not applicable", 0.0, problem
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
        root = Path(tmp)
        _copy_tree(root)
        target = root / mutation.path
        target.write_text(target.read_text().replace(mutation.original, mutation.mutated))
        env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                   *mutation.tests], cwd=root, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start, f"tests ran past {timeout} s"
        seconds = time.perf_counter() - start
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        if proc.returncode == 0:
            return "SURVIVED", seconds, last
        failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
        return "killed", seconds, (failed[0] if failed else last)[:160]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mutation's tests (default 600)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations: {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name:<26} {m.path}: {m.what}\n{'':<26} must be caught by {', '.join(m.tests)}")
        return 0
    rows = []
    for m in chosen:
        status, seconds, detail = run(m, args.timeout)
        rows.append((m.name, status, seconds, detail))
        print(f"{status:<15} {m.name:<26} {seconds:6.1f}s  {detail}", flush=True)
    survivors = [name for name, status, *_ in rows if status != "killed"]
    print(f"\n{len(rows) - len(survivors)} of {len(rows)} planted bugs killed"
          + (f"; not killed: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
