#!/usr/bin/env bash
# Run the test suite on CPU, offline. Creates .venv if missing and installs everything itself.
#   bash scripts/test.sh                 # the default suite (CPU-fast + distributed)
#   bash scripts/test.sh -m "not distributed" -x    # extra pytest arguments are passed through
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[test.sh] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
  # The CPU wheel first: a plain `pip install -e .` would resolve torch to a multi-GB CUDA build.
  echo "[test.sh] installing torch==2.13.0 (CPU)"
  pip install -q torch==2.13.0
fi
if ! python -c "import minillm, pytest, deepspeed, rouge_score" 2>/dev/null || [ pyproject.toml -nt "$VENV/.minillm-installed" ]; then
  echo "[test.sh] installing minillm[test]"
  pip install -q -e ".[test]"
  touch "$VENV/.minillm-installed"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}
python -m pytest -q "$@"
