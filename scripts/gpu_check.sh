#!/usr/bin/env bash
# Issue 7's GPU checks and benchmarks, one step per call so each fits a 10-minute slot on a lent H100:
#
#   bash scripts/gpu_check.sh tests     # pytest -m gpu: CUDA-graph engine vs eager static, speculative, eval engine, sampling copy
#   bash scripts/gpu_check.sh bench     # rollout / scoring / training / single-step KL at the 16x512 target shape
#   bash scripts/gpu_check.sh phase     # one measured MiniLLM phase (256 rollouts, 4 PPO epochs), naive vs fast
#   bash scripts/gpu_check.sh gpt2      # the GPT-2 preset
#
# It runs from the source tree (PYTHONPATH), with whatever python3 holds a CUDA torch and transformers: these steps
# import neither deepspeed, datasets nor rouge-score, so a bare GPU image without them works (checked on CPU by
# hiding those packages; the engine, loss and bench tests also pass on CPU with the image's transformers 5.17 and
# huggingface_hub 1.33). Results and logs go to $OUT (the device tool's folder) or benchmarks/results/gpu-run/;
# copy the JSON files into benchmarks/results/ and commit them.
set -uo pipefail

step=${1:?"usage: bash scripts/gpu_check.sh tests|bench|phase|gpt2"}
out=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}

gpu=$("$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(0).lower().replace('nvidia', '').split()[0])") || { echo "gpu_check: $py has no torch with a CUDA device"; exit 1; }
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'gpu', torch.cuda.get_device_name(0))" | tee "$out/versions.txt"

case "$step" in
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
  *)
    echo "unknown step $step: tests|bench|phase|gpt2"; exit 2 ;;
esac
