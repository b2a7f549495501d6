"""minillm-bench: time every phase of a MiniLLM step, naive and fast paths side by side, and write JSON.

    minillm-bench --preset tiny --output benchmarks/results/cpu-tiny.json         # CPU, seconds
    minillm-bench --preset opt-1.3b-13b --output benchmarks/results/h100-opt.json  # one H100, bf16 (DESIGN §7)
    minillm-bench --student-path DIR --teacher-path DIR --batch 16 ...            # real checkpoints

Models are random-initialised from named shapes (no hub download) unless paths are given. Phases:
rollout (naive loop vs fast engine, eager and, on CUDA, static cache + CUDA graphs), teacher scoring (plain vs
chunked log-probs), student training forward+backward on a rollout micro-batch (PPO log-probs + single-step KL,
plain vs chunked), the single-step KL alone from hidden states (plain vs chunked), and what reusing the
teacher's scoring across PPO epochs saves (the teacher forward each micro-step would otherwise repeat). Each
reports tokens/s, peak memory (CUDA) and the fraction of the device's bandwidth (decoding) or bf16 FLOP limit
(scoring, training) from a small table of known devices; on other devices the limit is reported as unknown.

``--phase`` also runs one whole phase end to end through ``MiniLLMTrainer.run_phase`` per configuration (naive:
teacher every step, plain losses, teacher re-runs; fast: the defaults), from the same weights and data, and
reports it as ``phases.phase_measured`` next to the composed ``phases.phase_estimate``.
"""

from __future__ import annotations

import argparse

# name → (transformers model_type, config fields). Published shapes; vocabularies as released.
SHAPES: dict[str, tuple[str, dict]] = {
    "tiny-student": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4)),
    "tiny-teacher": ("llama", dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=4)),
    "gpt2": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12)),
    "gpt2-medium": ("gpt2", dict(n_embd=1024, n_layer=24, n_head=16)),
    "gpt2-large": ("gpt2", dict(n_embd=1280, n_layer=36, n_head=20)),
    "gpt2-xl": ("gpt2", dict(n_embd=1600, n_layer=48, n_head=25)),
    "opt-1.3b": ("opt", dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32)),
    "opt-2.7b": ("opt", dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32)),
    "opt-6.7b": ("opt", dict(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32)),
    "opt-13b": ("opt", dict(hidden_size=5120, ffn_dim=20480, num_hidden_layers=40, num_attention_heads=40)),
    "llama-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32)),
    "llama-13b": ("llama", dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                num_attention_heads=40, num_key_value_heads=40)),
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("qwen2", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                   num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                   tie_word_embeddings=True)),
    "qwen2.5-7b": ("qwen2", dict(vocab_size=151936, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4)),
}
# name → (student shape, teacher shape, batch, prompt length, new tokens, train batch)
PRESETS = {
    "tiny": ("tiny-student", "tiny-teacher", 4, 16, 16, 4),
    "gpt2": ("gpt2", "gpt2-xl", 64, 128, 256, 16),
    "opt-1.3b-13b": ("opt-1.3b", "opt-13b", 64, 128, 256, 16),
    "opt-2.7b-13b": ("opt-2.7b", "opt-13b", 64, 128, 256, 16),
    "opt-6.7b-13b": ("opt-6.7b", "opt-13b", 32, 128, 256, 8),
    "llama-7b-13b": ("llama-7b", "llama-13b", 32, 128, 256, 8),
    "qwen2.5-1.5b-7b": ("qwen2.5-1.5b", "qwen2.5-7b", 64, 128, 256, 16),
}
# substring of torch.cuda.get_device_name() → (memory bandwidth B/s, dense bf16 FLOP/s), vendor datasheets
DEVICES = {
    "H200": (4.8e12, 989e12),
    "H100 PCIe": (2.0e12, 756e12),
    "H100": (3.35e12, 989e12),  # SXM
    "A100-SXM4-80GB": (2.039e12, 312e12),
    "A100": (1.555e12, 312e12),
}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillm-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="shapes and sizes (default: tiny)")
    p.add_argument("--student", choices=sorted(SHAPES), help="student shape (overrides the preset)")
    p.add_argument("--teacher", choices=sorted(SHAPES), help="teacher shape (overrides the preset)")
    p.add_argument("--student-path", help="a real student checkpoint (HF folder) instead of a random shape")
    p.add_argument("--teacher-path", help="a real teacher checkpoint (HF folder) instead of a random shape")
    p.add_argument("--batch", type=int, help="rollout batch (prompts)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, help="tokens generated per prompt")
    p.add_argument("--train-batch", type=int, help="micro-batch of the scoring/training phases")
    p.add_argument("--alpha", type=float, default=0.2, help="teacher mix α (default 0.2, the reference)")
    p.add_argument("--chunk-size", type=int, default=1024, help="positions per chunk of the chunked losses")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph rollout")
    p.add_argument("--skip-naive", action="store_true", help="skip the naive rollout (it is the slowest phase)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per measurement after one untimed warm-up; the median is reported (default 3)")
    p.add_argument("--ppo-epochs", type=int, default=4, help="PPO epochs of the whole-phase estimate (default 4)")
    p.add_argument("--draft-tokens", type=int, default=4,
                   help="also time the speculative engine with this many draft tokens per round (0: skip; default 4)")
    p.add_argument("--kl-target", metavar="BxL",
                   help="also measure the single-step KL alone at batch B x L tokens with the models' head sizes "
                        "and vocabulary, plain vs chunked: peak memory and speed (the issue target: 16x512)")
    p.add_argument("--kl-only", action="store_true",
                   help="measure only --kl-target (default 16x512); builds no model, only heads of its sizes")
    p.add_argument("--phase", action="store_true",
                   help="also run one whole phase end to end through MiniLLMTrainer per configuration (naive, fast; "
                        "fast_pt_cache with --pt-cache-top-k) and report it as phases.phase_measured")
    p.add_argument("--phase-only", action="store_true", help="measure only the whole phase (skip the parts)")
    p.add_argument("--phase-variants", default="naive,fast",
                   help="comma-separated configurations of the measured phase: naive, fast, speculative "
                        "(default naive,fast)")
    p.add_argument("--phase-rollouts", type=int, help="rollouts of the measured phase (default: 4 x batch)")
    p.add_argument("--pt-cache-top-k", type=int, default=0,
                   help="> 0: also time the phase with a teacher top-k cache of the pre-training chunks (built "
                        "first, its build time reported separately)")
    p.add_argument("--extra-teacher", action="append", default=[], metavar="NAME=SHAPE|PATH",
                   help="multi-teacher routing: also time scoring the same rollouts with this teacher (a shape name "
                        "or an HF folder; repeatable); reported per teacher as phases.teacher_scoring_per_teacher")
    p.add_argument("--served", action="store_true",
                   help="also measure a served teacher (minillm-teacher-serve, in this process): bytes per token of "
                        "hidden states vs full logits vs top-k, and teacher scoring colocated vs served")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the JSON result here (default: print only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    import json
    import sys
    from pathlib import Path

    from ..bench import run_benchmark

    result = run_benchmark(args, SHAPES, PRESETS, DEVICES)
    from ..bench.breakdown import format_breakdown

    for name, entry in result.get("phases", {}).get("rollout", {}).items():  # where the rollout time goes
        if isinstance(entry, dict) and "breakdown" in entry:
            print(format_breakdown(name, entry["breakdown"]), file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    from . import run_console

    run_console(main)
