#!/usr/bin/env bash
# Run the test suite on CPU, offline. Creates .venv if missing and installs everything itself.
#   bash scripts/test.sh                 # the default suite (CPU-fast + distributed)
#   bash scripts/test.sh -m "not distributed" -x    # extra pytest arguments are passed through
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh
ensure_venv test.sh test "minillm, pytest, deepspeed, rouge_score, matplotlib, accelerate"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}
python -m pytest -q "$@"
