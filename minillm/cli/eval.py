"""minillm-eval: the paper's evaluation (DESIGN §6) of one or several checkpoints, side by side.

    minillm-eval --model runs/sft/gpt2-base/best runs/minillm/gpt2-base/best --name SFT MiniLLM \\
        --data dolly self_inst vicuna sinst uinst --out runs/eval/gpt2-base
    minillm-eval --config configs/eval/gpt2-base.yaml --seeds 10      # flags override the file
    torchrun --nproc_per_node 8 -m minillm.cli.eval --model ... --data dolly --out ...   # data-parallel
    deepspeed --num_gpus 8 -m minillm.cli.eval --zero3 --model big-model ...             # ZeRO-3 inference

Protocol: prompt = the record's `prompt` (or its rendered template), tokenised without special tokens
(--prompt-bos: with the tokenizer's default ones), cut
to its first --max-prompt-length tokens, left-padded; sampling T=1, top-k 0, top-p 1, 256 new tokens, seeds
10 20 30 40 50; responses decoded without special tokens and stripped; Rouge-L and exact match x100, max
over references; mean and population std over seeds; fp16 on CUDA (--dtype auto), fp32 on CPU.

Presets (--preset; flags and the YAML's own keys override them):
  paper          Table 1 as published: no n-gram block, prompts with the tokenizer's default special tokens
                 (BOS for OPT/LLaMA; GPT-2 unchanged), as the reference code was at publication
  official-head  the current reference code: --no-repeat-ngram-size 6, prompts without special tokens

Writes OUT/<model>/<set>/seed<k>.json, OUT/results.json, OUT/table.md (Rouge-L, also printed) and
OUT/table_all.md (every metric). Judge settings come from the environment: MINILLM_JUDGE_BASE_URL (or
OPENAI_BASE_URL), MINILLM_JUDGE_MODEL, MINILLM_JUDGE_API_KEY (or OPENAI_API_KEY); the key is never logged.
"""

from __future__ import annotations

import argparse

from . import finish_process

S = argparse.SUPPRESS  # flags the user did not give stay out of the namespace, so the YAML can set them


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillm-eval", description=__doc__, argument_default=S,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--model", nargs="+", metavar="DIR", help="model folders (or hub ids) to compare")
    g.add_argument("--name", nargs="+", metavar="NAME", help="display names, one per --model "
                   "(default: folder names; parent/child when two are equal)")
    g.add_argument("--data", nargs="+", metavar="NAME_OR_FILE",
                   help="sets: dolly self_inst vicuna sinst uinst (hub MiniLLM/*, or cache_dir/sets/<name>/), "
                        "a local .json/.jsonl file or folder, or a hub dataset id")
    g.add_argument("--out", "--output", dest="out", metavar="OUTDIR", help="output folder")
    g.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of these options (keys = flag names "
                   "with underscores); flags given on the command line override it")
    g.add_argument("--num", type=int, help="evaluate the first N records of each set (default -1: all)")
    g.add_argument("--template", choices=["auto", "reference", "chat", "raw"],
                   help="prompt template for instruction-only records (default auto: the record's prompt, else "
                        "the reference template)")
    g.add_argument("--cache-dir", dest="cache_dir", help="where named sets are looked up before the hub "
                   "(default .cache/minillm)")
    s = p.add_argument_group("sampling (defaults = the paper's protocol)")
    s.add_argument("--preset", choices=["paper", "official-head"],
                   help="a named protocol (see above): paper reproduces Table 1, official-head the current "
                        "reference code")
    s.add_argument("--seeds", nargs="+", type=int, help="seeds (default 10 20 30 40 50)")
    s.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, help="default 256")
    s.add_argument("--max-prompt-length", dest="max_prompt_length", type=int,
                   help="prompts are cut to their FIRST this many tokens (default 256; evaluation truncates, "
                        "it does not drop)")
    s.add_argument("--batch-size", dest="batch_size", type=int, help="prompts per generation batch (default 16)")
    s.add_argument("--temperature", type=float, help="default 1.0")
    s.add_argument("--top-k", dest="top_k", type=int, help="default 0 (off)")
    s.add_argument("--top-p", dest="top_p", type=float, help="default 1.0 (off)")
    s.add_argument("--no-repeat-ngram-size", dest="no_repeat_ngram_size", type=int,
                   help="block repeated n-grams (default 0: off). The reference scripts pass 6, but in the "
                        "paper-era fork the sampler overwrote the processed scores, so the block was inert and "
                        "the paper's numbers were most likely produced without it (lmops-notes §5); "
                        "--preset official-head sets 6")
    s.add_argument("--prompt-bos", dest="prompt_bos", action="store_true",
                   help="encode prompts with the tokenizer's default special tokens, as the reference did before "
                        "2024: OPT/LLaMA prompts start with BOS (counted in --max-prompt-length), GPT-2 and Qwen "
                        "prompts are unchanged. Set by --preset paper")
    s.add_argument("--no-prompt-bos", dest="prompt_bos", action="store_false",
                   help="encode prompts without special tokens (the default; overrides a preset or YAML)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    r.add_argument("--engine", choices=["auto", "hf", "fast"],
                   help="sampler: hf (transformers generate), fast (minillm's rollout engine with static caches and "
                        "CUDA graphs), auto (default: fast on CUDA unless --zero3 or --no-repeat-ngram-size)")
    r.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"],
                   help="model weights (default auto: fp16 on CUDA, the paper protocol's precision; fp32 on CPU)")
    r.add_argument("--zero3", action="store_true", help="shard the models with DeepSpeed ZeRO-3 over the ranks "
                   "(launch with deepspeed/torchrun) for models that do not fit one GPU")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    a = p.add_argument_group("analyses")
    a.add_argument("--teacher", metavar="DIR", help="also report teacher_logprob (token mean of the teacher's "
                   "log p over the model's samples, EOS included) and reverse_kl_k3 (length-normalised k3)")
    a.add_argument("--dist", action="store_true", help="also report dist4 (Dist-4 x100 over each set's responses)")
    a.add_argument("--judge", action="store_true", help="LLM-judge feedback score (100 * sum model / sum "
                   "reference scores) through an OpenAI-compatible endpoint configured by the environment")
    a.add_argument("--judge-workers", dest="judge_workers", type=int, help="parallel judge requests (default 4)")
    a.add_argument("--exposure-bias", dest="exposure_bias", action="store_true",
                   help="ExAccErr against --teacher on each set (first seed)")
    a.add_argument("--lm-loss", dest="lm_loss", action="store_true",
                   help="teacher-forced LM loss (nats/token) of the references")
    a.add_argument("--calibration", choices=["sst2", "boolq"], help="ECE of option choices on SST-2 or BoolQ")
    a.add_argument("--calibration-data", dest="calibration_data", metavar="FILE_OR_HUB_ID",
                   help="local .json/.jsonl (sst2: sentence,label; boolq: question,passage,answer) or hub id "
                        "(default stanfordnlp/sst2 or google/boolq, validation split)")
    a.add_argument("--calibration-num", dest="calibration_num", type=int, help="first N calibration rows")
    p.add_argument("--local_rank", "--local-rank", type=int, help=S)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(make_parser().parse_args(argv))
    args.pop("local_rank", None)
    from ..evaluation.settings import SettingsError, resolve_settings

    try:
        settings = resolve_settings(args, args.get("config"))
    except SettingsError as e:
        from . import report_user_error

        return report_user_error("minillm-eval", e)
    from ..errors import UserError
    from ..evaluation.protocol import run_eval
    from . import report_user_error

    try:
        outcome = run_eval(settings)
    except (UserError, OSError) as e:  # data, models, judge settings, paths: one line, exit 2
        return report_user_error("minillm-eval", e)
    if outcome.table:
        print(f"\nRouge-L (mean ± std over seeds {' '.join(map(str, settings.seeds))}); "
              f"results in {outcome.out_dir}/results.json\n")
        print(outcome.table, end="")
    return finish_process(0)


if __name__ == "__main__":
    from . import run_console

    run_console(main)
