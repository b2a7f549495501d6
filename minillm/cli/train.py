"""minillm-train: train with SFT, word-level KD, SeqKD or MiniLLM from a YAML config.

    minillm-train --config configs/tiny/kd.yaml
    minillm-train --config opt-1.3b.yaml train.max_steps=100 optim.lr=1e-5
    minillm-train --config configs/tiny/sft.yaml --dry-run          # validate, print resolved YAML, exit
    minillm-train --config configs/tiny/sft.yaml --resume            # continue the newest checkpoint
    minillm-train --config configs/tiny/sft.yaml --resume auto       # the newest checkpoint, or start fresh
    minillm-train --config ... train.max_time=3:55:00 --resume auto  # checkpoint and exit 75 before 3h55m

SIGTERM, SIGINT or SIGUSR1 during training: the current optimizer step is finished on every rank, a checkpoint of
that exact position is written and the process exits with status 75 (EX_TEMPFAIL), as when train.max_time is
nearly used; `--resume auto` continues to the same weights and metrics as an uninterrupted run. Exit status 2: a
problem with the config, data, paths or models, printed as one line.
    deepspeed --num_gpus 8 -m minillm.cli.train --config configs/minillm/opt-1.3b.yaml
    torchrun --nproc_per_node 8 -m minillm.cli.train --config ... strategy.backend=deepspeed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import finish_process


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillm-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML file, or the name of a shipped config (opt-1.3b.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the YAML")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved, exit")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip the teacher/student pre-flight check (minillm-check --config) before loading models")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                   help="continue exactly from the newest checkpoint of output_dir, or from DIR; `--resume auto`: "
                        "the newest checkpoint if there is one, else start fresh (for requeued jobs)")
    p.add_argument("--explain", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_intermixed_args(argv)  # overrides may follow --resume, --no-preflight ...
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # `--resume output_dir=x`: argparse gave the override to --resume's optional DIR
        args.overrides.append(args.resume)
        args.resume = "latest"
    from ..config import ConfigError, explain, load_config, to_yaml

    if args.explain:
        print("\n".join(explain()))
        return 0
    if not args.config:
        print("minillm-train: error: --config is required (see --help)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"minillm-train: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    if not args.no_preflight and not preflight_passes(cfg):
        return 2
    return finish_process(run(cfg, resume=args.resume))



def preflight_passes(cfg) -> bool:
    """The pre-flight checks (minillm.preflight), before any weight is loaded: warnings and errors are printed by
    the first rank, and an error stops every rank (each runs the same checks on the same files)."""
    import os

    from ..preflight import ERROR, preflight

    first = os.environ.get("RANK", "0") == "0"
    try:
        findings = preflight(cfg)
    except (OSError, ValueError) as e:  # a missing model or tokenizer folder: one line, no traceback
        if first:
            print(f"minillm-train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return False
    for finding in findings:  # dtype advice is logged by build_trainer, on the device the run really got
        if first and finding.severity != "info" and finding.check != "dtype":
            print(f"minillm-train pre-flight: {finding.line()}", file=sys.stderr)
    errors = sum(f.severity == ERROR for f in findings)
    if errors and first:
        print(f"minillm-train: error: the pre-flight check found {errors} error(s), listed above; fix them, or "
              "pass --no-preflight to train anyway", file=sys.stderr)
    return not errors


def run(cfg, resume: str | None = None) -> int:
    """Build everything from a resolved config and train. Importable for notebooks and tests."""
    from ..checkpoint import resolve_resume_dir, seed_everything
    from ..config import to_yaml
    from ..strategy import build_strategy
    from ..tracking import setup_logging

    strategy = build_strategy(cfg).setup()
    log = setup_logging(cfg.output_dir, strategy.is_main, strategy.rank)
    ok = False
    try:
        cfg.resolve(strategy.world_size)
        out = Path(cfg.output_dir)
        resume_dir = resolve_resume_dir(resume, out) if resume else None
        seed_everything(cfg.seed + strategy.rank)
        # data and models first: a typo in them must fail before anything in output_dir is rewritten or moved
        trainer = build_trainer(cfg, strategy)
        if strategy.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(to_yaml(cfg))
        metrics = out / "metrics.jsonl"
        if resume_dir is None and strategy.is_main and metrics.exists():
            # a fresh start in a used folder (a run killed before its first checkpoint, then requeued): its rows
            # would mix with this run's; keep them aside rather than delete them
            metrics.replace(out / "metrics.previous.jsonl")
            log.warning("%s held rows of an earlier start without a checkpoint; moved to metrics.previous.jsonl",
                        metrics)
        result = trainer.train(resume_from=resume_dir)
        log.info("done: %s", result)
        ok = True
    finally:
        strategy.cleanup(ok)  # no barrier while an exception unwinds: it would hang instead of failing
    if result.get("stopped"):  # a signal or train.max_time: the checkpoint is written, the run is not finished
        from ..trainers.preemption import EXIT_PREEMPTED

        log.warning("stopped early (%s): exit status %d; continue with --resume auto", result["stopped"],
                    EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    return 0


def build_trainer(cfg, strategy):
    """Load tokenizer, models and data for ``cfg.method`` and construct its trainer."""
    from ..data import build_instruction_data
    from ..models import load_model, load_model_shape, load_tokenizer
    from ..tracking import get_logger

    log = get_logger()
    tokenizer = load_tokenizer(cfg.student)
    data = build_instruction_data(cfg.data, tokenizer, seed=cfg.seed)
    log.info("data: %s", data.stats)
    # under ZeRO-3 straight into shards: no rank holds a whole copy in host RAM
    student = load_model(cfg.student, trainable=True, zero3_config=strategy.zero3_init_config(), seed=cfg.seed)
    teacher, alignment = None, None
    if cfg.teachers:  # multi-teacher routing (minillm.routing): every teacher loaded once and checked like `teacher:`
        teacher = {}
        for spec in cfg.teachers:
            teacher[spec.name] = load_teacher(cfg, spec, strategy, spec.name)
            # logits are cut to the student tokenizer's vocabulary, the same for every teacher
            alignment = teacher_alignment(cfg, spec, student, tokenizer, teacher[spec.name], spec.name)
    elif cfg.method != "sft":
        student_data = cfg.kd.on_policy_fraction > 0 or cfg.kd.adaptive_off_policy  # sampled batches: online teacher
        if cfg.method in ("kd", "seqkd") and cfg.kd.teacher_cache is not None and not student_data:
            teacher = load_model_shape(cfg.teacher)  # never runs: its shapes are checked against the cache's
        elif cfg.teacher.server is not None:  # minillm-teacher-serve: only the LM head is loaded here
            from ..serve.remote import RemoteTeacher

            teacher = RemoteTeacher.from_config(cfg.teacher)
        else:
            teacher = load_teacher(cfg, cfg.teacher, strategy)
        alignment = teacher_alignment(cfg, cfg.teacher, student, tokenizer, teacher)
    if cfg.method == "minillm":
        from ..trainers.minillm import MiniLLMTrainer

        return MiniLLMTrainer(cfg, student, tokenizer, data, strategy, teacher=teacher, alignment=alignment)
    from ..trainers.sft import SFTTrainer

    return SFTTrainer(cfg, student, tokenizer, data, strategy, teacher=teacher, alignment=alignment)


def load_teacher(cfg, teacher_cfg, strategy, name: str | None = None):
    """One frozen teacher (of `teacher:` or `teachers:`), under ZeRO-3 straight into shards, after a warning when its
    precision is a poor choice for this student and device."""
    from ..models import load_model, teacher_precision_advice
    from ..tracking import get_logger

    advice = teacher_precision_advice(cfg.student.dtype, teacher_cfg.dtype, strategy.device.type, cfg.strategy.backend)
    if advice:
        get_logger().warning("%s%s", f"teacher {name}: " if name else "", advice)
    return load_model(teacher_cfg, trainable=False, zero3_config=strategy.zero3_init_config(teacher=True))


def teacher_alignment(cfg, teacher_cfg, student, tokenizer, teacher, name: str | None = None):
    """models.check_compatibility of one teacher with the student; an error names the teacher of `teachers:`."""
    from ..models import ModelCompatibilityError, check_compatibility, load_tokenizer

    teacher_tok = load_tokenizer(teacher_cfg) if (teacher_cfg.tokenizer or teacher_cfg.path) != (
        cfg.student.tokenizer or cfg.student.path) else None
    try:
        return check_compatibility(student, teacher, tokenizer, teacher_tok)
    except ModelCompatibilityError as e:
        if name is None:
            raise
        raise ModelCompatibilityError(f"teacher `{name}` ({teacher_cfg.path}): {e}") from e


if __name__ == "__main__":
    from . import run_console

    run_console(main)
