#!/usr/bin/env bash
# Run the test suite on CPU, offline. Creates .venv if missing and installs everything itself.
#   bash scripts/test.sh                 # the whole suite, on two pytest-xdist workers
#   bash scripts/test.sh -m "not distributed" -x    # extra pytest arguments are passed through (-n 0: one process)
# It also installs the demo's SmolLM2 teacher, so tests/test_demo_quick.py runs the quick demo as users run it.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh
ensure_venv test.sh test "minillm, pytest, xdist, gguf, deepspeed, rouge_score, matplotlib, accelerate"
ensure_demo_teacher test.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}
export MINILLM_REQUIRE_DEMO_ASSETS=1  # the quick-demo test fails, rather than skips, without the teacher
# Tests are dealt to the workers one by one (a module fixture may be built on both); tests/conftest.py puts the
# longest modules first. Grouping by module (loadscope/loadfile) measured slower here: 11:11 and 10:49 vs 8-9 min.
python -m pytest -q -n 2 --dist load "$@"
