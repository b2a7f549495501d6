#!/usr/bin/env bash
# GPU checks and benchmarks, one step per call so each fits a 10-minute slot on one GPU node:
#
#   bash scripts/gpu_check.sh run       # will training work here? (< 8 min on one GPU) minillm-check --device, every
#                                       # tiny recipe end to end on CUDA in bf16 and fp32 with dev evaluation, the
#                                       # minillm recipe under DeepSpeed ZeRO-2 and ZeRO-3 (torchrun, 1 process),
#                                       # minillm-bench --preset gpt2 --repeats 1; a pass/fail table at the end
#   bash scripts/gpu_check.sh wheels DIR   # on a machine WITH network: build the wheels `run` needs into DIR
#   bash scripts/gpu_check.sh tests     # pytest -m gpu: CUDA-graph engine vs eager static, speculative, eval engine, sampling copy
#   bash scripts/gpu_check.sh bench     # rollout / scoring / training / single-step KL at the 16x512 target shape
#   bash scripts/gpu_check.sh phase     # one measured MiniLLM phase (256 rollouts, 4 PPO epochs), naive vs fast
#   bash scripts/gpu_check.sh gpt2      # the GPT-2 preset
#   bash scripts/gpu_check.sh bench17 [all|gpt2|phase|opt]   # issue 17's numbers in one call of < 8 min (470 s of
#                                       # steps): the gpt2 preset (items 1, 5, 6: naive vs fast vs HF generate, the
#                                       # rollout breakdown, compile counts), the measured gpt2 phase with 256
#                                       # rollouts (item 4), the opt-1.3b-13b preset with the time left (items 2, 5;
#                                       # random weights, bf16); each step under `timeout`, then
#                                       # scripts/issue17_summary.py checks every target from the JSON files
#
# Offline GPU nodes often have torch, transformers, accelerate and peft but not datasets, deepspeed or rouge-score.
# `run` installs whatever of those is missing from the wheels in $WHEELS (default .whl/ in the repo, if it exists)
# into a private folder ($SITE, default /tmp/minillm-site) on PYTHONPATH; nothing is installed system-wide. Build that
# folder with the `wheels` step on a networked machine with the node's Python version (PYTHON_VERSION, default 3.12):
# deepspeed and rouge-score are source-only on PyPI, so they are built with `pip wheel --no-deps
# --no-build-isolation` (DS_BUILD_OPS=0: no CUDA ops are compiled ahead, the JIT builds what a run uses), and their
# pure-Python needs are downloaded beside them.
#
# It runs from the source tree (PYTHONPATH), with whatever python3 holds a CUDA torch and transformers: the other
# steps import neither deepspeed, datasets nor rouge-score, so a bare GPU image without them works (checked on CPU by
# hiding those packages; the engine, loss and bench tests also pass on CPU with the image's transformers 5.17 and
# huggingface_hub 1.33). Results and logs go to $OUT (the device tool's folder) or benchmarks/results/gpu-run/;
# copy the JSON files into benchmarks/results/ and commit them.
set -uo pipefail

step=${1:?"usage: bash scripts/gpu_check.sh run|wheels DIR|tests|bench|phase|gpt2|bench17 [all|gpt2|phase|opt]"}
py=${PYTHON:-python3}
# packages `run` needs beyond a typical GPU image, and their pure-Python requirements (pydantic-core is binary)
RUN_PACKAGES="datasets hjson pydantic pydantic-core annotated-types typing-inspection dill multiprocess nltk defusedxml"

if [ "$step" = wheels ]; then
  dir=${2:?"usage: bash scripts/gpu_check.sh wheels DIR"}
  pyver=${PYTHON_VERSION:-3.12}
  mkdir -p "$dir"
  # binary-compatible downloads for the node's Python (not this machine's)
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" $RUN_PACKAGES || exit 1
  # source-only: pure-Python wheels, built here against this machine's torch (none of their code is compiled)
  DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" deepspeed rouge-score || exit 1
  ls -1 "$dir"
  exit 0
fi

out=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then  # only to check the script itself on a CPU (tiny presets, see bench17)
  gpu=cpu
else
gpu=$("$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(0).lower().replace('nvidia', '').split()[0])") || { echo "gpu_check: $py has no torch with a CUDA device"; exit 1; }
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'gpu', torch.cuda.get_device_name(0))" | tee "$out/versions.txt"
fi

case "$step" in
  run)
    log="$out/gpu_check-run.log"
    : > "$log"
    wheels=${WHEELS:-.whl}
    missing=$("$py" -c "import importlib.util as u; print(' '.join(m for m in ('datasets','deepspeed','rouge_score') \
if u.find_spec(m) is None))")
    if [ -n "$missing" ]; then
      [ -d "$wheels" ] || { echo "gpu_check: missing $missing and no wheel folder $wheels (see the header: WHEELS=DIR)" \
        | tee -a "$log"; exit 1; }
      site=${SITE:-/tmp/minillm-site}
      echo "installing $missing from $wheels into $site" | tee -a "$log"
      "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl >> "$log" 2>&1 \
        || { echo "gpu_check: installing the wheels failed (see $log)"; exit 1; }
      export PYTHONPATH="$PYTHONPATH:$site"
    fi
    scratch=$(mktemp -d /tmp/minillm-gpu-check.XXXX)
    results="$scratch/results"
    : > "$results"
    # one bounded step: NAME SECONDS CMD...; appends "NAME pass|FAIL (rc) seconds" to the table
    bounded() {
      local name=$1 limit=$2 start=$SECONDS rc
      shift 2
      { echo "=== $name: $*"; timeout --kill-after=15 "$limit" "$@"; } > "$scratch/$name.log" 2>&1
      rc=$?
      cat "$scratch/$name.log" >> "$log"
      if [ $rc -eq 0 ]; then echo "$name pass $((SECONDS - start))s" >> "$results"
      elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "$name FAIL(timeout ${limit}s) $((SECONDS - start))s" >> "$results"
      else echo "$name FAIL(rc=$rc) $((SECONDS - start))s" >> "$results"; fi
    }
    bounded check 300 "$py" -m minillm.cli.check --device --json "$out/check.json"
    # every tiny recipe on CUDA, bf16 and fp32, a few steps with a dev evaluation; four at a time (tiny models)
    for recipe in sft kd seqkd minillm gkd distillm; do
      for dtype in bf16 fp32; do
        bounded "$recipe-$dtype" 240 "$py" -m minillm.cli.train --config "configs/tiny/$recipe.yaml" \
          "output_dir=$scratch/runs/$recipe-$dtype" strategy.device=cuda "student.dtype=$dtype" "teacher.dtype=$dtype" \
          train.max_steps=4 train.eval_interval=2 train.save_interval=2 &
        while [ "$(jobs -rp | wc -l)" -ge 4 ]; do sleep 1; done
      done
    done
    wait
    for stage in 2 3; do
      bounded "minillm-zero$stage" 240 "$py" -m torch.distributed.run --standalone --nproc_per_node 1 \
        -m minillm.cli.train --config configs/tiny/minillm.yaml "output_dir=$scratch/runs/zero$stage" \
        strategy.backend=deepspeed "strategy.zero_stage=$stage" strategy.device=cuda student.dtype=bf16 \
        teacher.dtype=bf16 train.max_steps=4 train.eval_interval=2 train.save_interval=2
    done
    bounded bench-gpt2 300 "$py" -m minillm.cli.bench --preset gpt2 --repeats 1 --output "$out/$gpu-gpt2-repeats1.json"
    { echo; echo "step                 result"; sort -k1,1 "$results" | awk '{printf "%-20s %s %s\n", $1, $2, $3}'; } \
      | tee -a "$log"
    ! grep -q FAIL "$results" ;;
  tests)
    "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_engine.py tests/test_speculative.py tests/test_eval_cli.py \
      tests/test_sampling_copy.py \
      2>&1 | tee "$out/pytest-gpu.log" ;;
  bench)
    "$py" -m minillm.cli.bench --preset opt-1.3b-13b --kl-target 16x512 \
      --output "$out/$gpu-opt-1.3b-13b.json" 2>&1 | tail -40 | tee "$out/bench.log" ;;
  phase)
    "$py" -m minillm.cli.bench --preset opt-1.3b-13b --phase-only --phase-rollouts 256 --pt-cache-top-k 64 \
      --output "$out/$gpu-opt-1.3b-13b-phase.json" 2>&1 | tail -40 | tee "$out/phase.log" ;;
  gpt2)
    "$py" -m minillm.cli.bench --preset gpt2 --output "$out/$gpu-gpt2.json" 2>&1 | tail -40 | tee "$out/gpt2.log" ;;
  bench17)
    which=${2:-all}
    budget=${BENCH17_SECONDS:-470}  # all steps together; the device tool allows 600 s per call
    deadline=$((SECONDS + budget))
    walls="$out/bench17-walls.txt"
    : > "$walls"
    # NAME CAP CMD...: runs under min(CAP, seconds left before the deadline); records "NAME SECONDS RC"
    b17() {
      local name=$1 cap=$2 start=$SECONDS left rc
      shift 2
      left=$((deadline - SECONDS - 5))
      [ "$left" -lt "$cap" ] && cap=$left
      if [ "$cap" -lt 30 ]; then echo "bench17: no time left for $name"; echo "$name 0 124" >> "$walls"; return; fi
      echo "=== bench17 $name (up to ${cap}s): $*"
      timeout --kill-after=10 "$cap" "$@" > "$out/bench17-$name.log" 2>&1
      rc=$?
      echo "$name $((SECONDS - start)) $rc" >> "$walls"
      tail -25 "$out/bench17-$name.log"
    }
    # on a CPU, to check this step: GPU_CHECK_ALLOW_CPU=1 BENCH17_GPT2=tiny BENCH17_OPT=tiny BENCH17_ROLLOUTS=8 \
    #   BENCH17_ARGS="--batch 4 --new-tokens 8 --train-batch 2 --ppo-epochs 1"
    p_gpt2=${BENCH17_GPT2:-gpt2} p_opt=${BENCH17_OPT:-opt-1.3b-13b} extra=${BENCH17_ARGS:-}
    case "$which" in all|gpt2)
      b17 gpt2 200 "$py" -m minillm.cli.bench --preset "$p_gpt2" --repeats 2 $extra --output "$out/$gpu-gpt2.json" ;;
    esac
    case "$which" in all|phase)
      b17 phase 150 "$py" -m minillm.cli.bench --preset "$p_gpt2" --phase-only --phase-rollouts "${BENCH17_ROLLOUTS:-256}" \
        $extra --output "$out/$gpu-gpt2-phase.json" ;; esac
    case "$which" in all|opt)
      b17 opt 300 "$py" -m minillm.cli.bench --preset "$p_opt" --repeats 2 $extra --output "$out/$gpu-opt-1.3b-13b.json" ;;
    esac
    "$py" scripts/issue17_summary.py --gpt2 "$out/$gpu-gpt2.json" --phase "$out/$gpu-gpt2-phase.json" \
      --opt "$out/$gpu-opt-1.3b-13b.json" --walls "$walls" | tee "$out/bench17-summary.txt" ;;
  *)
    echo "unknown step $step: run|wheels DIR|tests|bench|phase|gpt2|bench17"; exit 2 ;;
esac
