"""minillm-check: will a run work here?

    minillm-check --device                       # self-test every path a run on this machine would take
    minillm-check --device --device-type cpu     # the CPU paths only, on a GPU node too
    minillm-check --device --distributed         # also 2 ranks under DeepSpeed ZeRO-3 (gloo on a CPU)
    minillm-check --config RUN.yaml [key=value ...]   # pre-flight: will this teacher and student distil?

``--device`` builds tiny models in a scratch folder and exercises decoding (eager, static cache, compiled steps,
with early EOS), the bf16 sampling copy, bf16/fp16 autocast, the chunked and fused losses, one MiniLLM run with a
checkpoint and an exact resume, and with two or more visible GPUs a 2-rank ZeRO-3 run with sampling. It prints one
row per path (ok / fell back / failed / skipped, with the error or the reason) and exits 1 if any path failed.
A few minutes on one GPU; about a minute on a CPU.

``--config`` reads the run's tokenizers, model configs, generation configs and a sample of its records, without
loading a weight, and prints one line per finding (vocabulary, special tokens, tokenization, chat template, lengths,
sampling settings, logit post-processing, dtypes) with its fix; exit 2 on an error. ``minillm-train`` runs the same
checks before it loads a model.
"""

from __future__ import annotations

import argparse
import sys


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillm-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", action="store_true", help="run the device self-test")
    p.add_argument("--config", metavar="FILE", help="pre-flight check of a run config (path or shipped name)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with --config)")
    p.add_argument("--device-type", default="auto", choices=["auto", "cpu", "cuda"],
                   help="device to test (default auto: CUDA when available)")
    p.add_argument("--compiled-on-cpu", action="store_true",
                   help="on a CPU, also run the compiled decode through torch.compile (slow; CUDA runs it anyway)")
    p.add_argument("--distributed", action="store_true",
                   help="run the 2-rank ZeRO-3 check even without 2 GPUs (2 gloo ranks on a CPU)")
    p.add_argument("--scratch", metavar="DIR", help="keep the tiny models and runs here (default: a temp folder)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    return p


def _environment(device) -> str:
    import platform

    import torch

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("transformers", "deepspeed", "accelerate", "peft"):
        try:
            from importlib.metadata import version

            parts.append(f"{name} {version(name)}")
        except Exception:  # noqa: BLE001 — a missing package is information, not an error
            parts.append(f"{name} missing")
    if device.type == "cuda":
        parts.append(f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}")
    else:
        parts.append(f"CPU, {torch.get_num_threads()} threads")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.config:
        return run_preflight(args.config, args.overrides)
    if args.overrides:
        print("minillm-check: error: key=value overrides go with --config", file=sys.stderr)
        return 2
    if not args.device:
        print("minillm-check: error: choose a mode: --device or --config FILE (see --help)", file=sys.stderr)
        return 2
    import json
    import logging
    from dataclasses import asdict

    from ..device_check import FAILED, format_table, pick_device, run_device_checks

    try:
        device = pick_device(args.device_type)
    except ValueError as e:
        print(f"minillm-check: error: {e}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a weight-loading bar per tiny model would bury the rows
    print(f"minillm-check --device on {device}: {_environment(device)}", flush=True)
    # warnings of the library while the checks run, on this command's stderr; the handler goes when they are done
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("  %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("minillm")
    logger.addHandler(handler)
    try:
        results = run_device_checks(device, scratch=args.scratch, compiled_on_cpu=args.compiled_on_cpu,
                                    distributed=True if args.distributed else None,
                                    report=lambda r: print(f"  {r.status:<9} {r.name} ({r.seconds:.1f}s)", flush=True))
    finally:
        logger.removeHandler(handler)
    print()
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    failed = [r.name for r in results if r.status == FAILED]
    print(f"\n{len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def run_preflight(config: str, overrides: list[str], *, quiet_ok: bool = False) -> int:
    """Print the pre-flight findings of a config; 2 on a config error or an error finding, else 0."""
    from ..config import ConfigError, load_config
    from ..preflight import ERROR, has_errors, preflight

    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"minillm-check: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    try:
        findings = preflight(cfg)
    except (OSError, ValueError) as e:  # a missing model folder or tokenizer: say which, no traceback
        print(f"minillm-check: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for f in findings:
        if not (quiet_ok and f.severity == "info"):
            print(f.line(), file=sys.stderr if f.severity == ERROR else sys.stdout)
    errors = sum(f.severity == ERROR for f in findings)
    if not quiet_ok or errors:
        print(f"pre-flight: {errors} error(s), {sum(f.severity == 'warning' for f in findings)} warning(s)")
    return 2 if has_errors(findings) else 0


if __name__ == "__main__":
    from . import run_console

    run_console(main)
