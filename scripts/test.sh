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
# Two pytest-xdist workers deal the tests out one by one (tests/conftest.py puts the longest modules first). The
# quick demo (tests/test_demo_quick.py, ~2.5 min) runs after them, alone: beside another worker its multi-threaded
# stages slowed everything down (one 2-worker run of all: 11:30; this split: see README "Tests").
if [ $# -eq 0 ]; then
  python -m pytest -q -n 2 --dist load --ignore tests/test_demo_quick.py
  python -m pytest -q tests/test_demo_quick.py
else
  python -m pytest -q -n 2 --dist load "$@"  # your selection, in one run
fi
