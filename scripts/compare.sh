#!/usr/bin/env bash
# Every distillation method of the library on the tiny CPU assets, same data, seed and evaluation; prints the
# comparison table (markdown) and writes runs/compare/tiny/compare.json. For a real pair, e.g.:
#   scripts/compare.sh --pair gpt2-base --data dolly self_inst vicuna sinst uinst --eval-seeds 10 20 30 40 50 \
#       --out runs/compare/gpt2-base --launcher "deepspeed --num_gpus 8" --methods kd kd-srkl gkd distillm minillm
# (arguments given here replace the tiny defaults below; the paper recipes need their SFT runs first).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
if [ "$#" -gt 0 ]; then
  exec python -m minillm.cli.compare "$@"
fi
exec python -m minillm.cli.compare --pair tiny \
  --methods sft kd kd-rkl kd-tvd seqkd gkd distillm minillm minillm-single-step minillm-ranking opd \
  --data tests/assets/data/dev.jsonl --num 16 --max-new-tokens 24 --out runs/compare/tiny --no-progress \
  --train-override train.max_steps=10 train.eval_interval=5 train.save_interval=0 eval.num_prompts=8
