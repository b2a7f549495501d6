#!/usr/bin/env bash
# The paper's comparison for one model family, end to end, every command printed before it runs:
#   SFT teacher -> SFT student -> SeqKD data (minillm-generate) -> KD and SeqKD baselines -> MiniLLM
#   -> minillm-eval of teacher, SFT, KD, SeqKD and MiniLLM side by side in one table.
#
#   bash scripts/pipeline.sh gpt2                 # configs/{sft,kd,seqkd,minillm}/gpt2-*.yaml (GPUs, hours)
#   bash scripts/pipeline.sh gpt2 --tiny          # the same chain on tests/assets in about a minute on CPU
#   bash scripts/pipeline.sh gpt2 --runs /data/runs --student gpt2-medium
#
# Options: --tiny, --runs DIR (default runs/pipeline-FAMILY[-tiny]), --student NAME (config stem of the student;
# gpt2-base, opt-1.3b, llama-7b by default), --teacher NAME (config stem of the SFT teacher; gpt2-xl, opt-13b, llama-13b), --seeds "..",
# --force (re-run steps whose output already exists; by default a finished step is skipped, so a stopped pipeline
# continues where it stopped).
# Environment: TRAIN (default "python -m minillm.cli.train"; e.g. "deepspeed --num_gpus 8 -m minillm.cli.train"),
# EVAL (default "python -m minillm.cli.eval"; e.g. "torchrun --nproc_per_node 8 -m minillm.cli.eval"; it runs
# with --dtype auto: fp16 on GPUs, the paper protocol's precision, fp32 on CPU),
# GENERATE (default "python -m minillm.cli.generate"). MiniLLM's PT loss needs the packed corpus named in its
# config (data.pretrain); build it first with `minillm-data --tokenizer gpt2 --pretrain ... --out ...`, or set
# MINILLM_EXTRA="minillm.ptx_coef=0" to train without it.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
[ $# -ge 1 ] || usage 2
case $1 in -h|--help) usage 0 ;; -*) echo "pipeline.sh: the first argument is the family" >&2; usage 2 ;; esac
FAMILY=$1; shift
TINY=0; RUNS=""; STUDENT=""; TEACHER=""; SEEDS=""; FORCE=0
while [ $# -gt 0 ]; do
  case $1 in
    --tiny) TINY=1 ;;
    --runs) RUNS=$2; shift ;;
    --student) STUDENT=$2; shift ;;
    --teacher) TEACHER=$2; shift ;;
    --seeds) SEEDS=$2; shift ;;
    --force) FORCE=1 ;;
    -h|--help) usage 0 ;;
    *) echo "pipeline.sh: unknown option $1" >&2; usage 2 ;;
  esac
  shift
done
TRAIN=${TRAIN:-python -m minillm.cli.train}
EVAL=${EVAL:-python -m minillm.cli.eval}
GENERATE=${GENERATE:-python -m minillm.cli.generate}
MINILLM_EXTRA=${MINILLM_EXTRA:-}

STEP=0
run() {  # run "description" cmd...: print the step and its command, then run it
  STEP=$((STEP + 1)); local what=$1; shift
  echo; echo "==> [$STEP] $what"; echo "    $*"
  "$@"
}
done_already() { [ "$FORCE" = 0 ] && [ -e "$1" ]; }
model_of() { if [ -d "$1/best" ]; then echo "$1/best"; else echo "$1/final"; fi; }

if [ "$TINY" = 1 ]; then
  RUNS=${RUNS:-runs/pipeline-$FAMILY-tiny}
  SEEDS=${SEEDS:-10 20}
  # Few steps on the committed tiny assets; the trained tiny teacher stands in for the family's big model.
  FEW="train.max_steps=4 train.eval_interval=0 train.save_interval=0 logging.progress_bar=false"
  SFT_T_CFG=configs/tiny/sft.yaml; SFT_T_ARGS="student.path=tests/assets/teacher optim.lr=1e-4 $FEW"  # gentle: it is trained already
  SFT_S_CFG=configs/tiny/sft.yaml; SFT_S_ARGS="$FEW"
  KD_CFG=configs/tiny/kd.yaml; SEQKD_CFG=configs/tiny/seqkd.yaml; MINILLM_CFG=configs/tiny/minillm.yaml
  KD_ARGS="$FEW"; SEQKD_ARGS="$FEW"; MINILLM_ARGS="$FEW rollout.num_rollouts=16 minillm.ppo_epochs=1"
  GEN_DATA=tests/assets/data/train.jsonl; GEN_ARGS="--max-new-tokens 24 --max-prompt-length 128 --num 64"
  GEN_DEV_NUM=16  # the first 16 records keep their gold answers as SeqKD's dev set
  EVAL_DATA=tests/assets/data/dev.jsonl; EVAL_ARGS="--max-new-tokens 16 --num 16 --dist"
else
  RUNS=${RUNS:-runs/pipeline-$FAMILY}
  SEEDS=${SEEDS:-10 20 30 40 50}
  case $FAMILY in
    gpt2) TEACHER=${TEACHER:-gpt2-xl}; STUDENT=${STUDENT:-gpt2-base} ;;
    opt) TEACHER=${TEACHER:-opt-13b}; STUDENT=${STUDENT:-opt-1.3b} ;;
    llama) TEACHER=${TEACHER:-llama-13b}; STUDENT=${STUDENT:-llama-7b} ;;
    *) [ -n "$TEACHER" ] && [ -n "$STUDENT" ] || {
         echo "pipeline.sh: give --teacher and --student (config stems) for family $FAMILY" >&2; exit 2; } ;;
  esac
  for f in configs/sft/$TEACHER.yaml configs/sft/$STUDENT.yaml configs/kd/$STUDENT.yaml configs/seqkd/$STUDENT.yaml \
           configs/minillm/$STUDENT.yaml; do
    [ -f "$f" ] || { echo "pipeline.sh: missing recipe $f (see configs/)" >&2; exit 2; }
  done
  SFT_T_CFG=configs/sft/$TEACHER.yaml; SFT_T_ARGS=""
  SFT_S_CFG=configs/sft/$STUDENT.yaml; SFT_S_ARGS=""
  KD_CFG=configs/kd/$STUDENT.yaml; SEQKD_CFG=configs/seqkd/$STUDENT.yaml; MINILLM_CFG=configs/minillm/$STUDENT.yaml
  KD_ARGS=""; SEQKD_ARGS=""; MINILLM_ARGS=""
  GEN_DATA=dolly; GEN_ARGS=""
  GEN_DEV_NUM=1000  # Dolly's dev split, as the reference: gold answers, not teacher samples
  EVAL_DATA="dolly self_inst vicuna sinst uinst"; EVAL_ARGS="--dist"
fi

T_DIR=$RUNS/sft-teacher; S_DIR=$RUNS/sft-student; SEQKD_DATA=$RUNS/seqkd-data/train.jsonl
SEQKD_DEV=$RUNS/seqkd-data/dev.jsonl
echo "pipeline: family $FAMILY$([ "$TINY" = 1 ] && echo ' (tiny)'), runs in $RUNS, seeds $SEEDS"

# shellcheck disable=SC2086  # the *_ARGS lists are meant to split into words
{
done_already "$T_DIR/final" || run "SFT teacher" $TRAIN --config "$SFT_T_CFG" output_dir="$T_DIR" $SFT_T_ARGS
TEACHER_MODEL=$(model_of "$T_DIR")
done_already "$S_DIR/final" || run "SFT student (the MiniLLM init and the 'SFT w/o KD' row)" \
  $TRAIN --config "$SFT_S_CFG" output_dir="$S_DIR" $SFT_S_ARGS
STUDENT_MODEL=$(model_of "$S_DIR")   # the MiniLLM init: best by dev loss (the recipe's select_best_by)
# the "SFT w/o KD" row: best by dev Rouge-L, as the official README picks the baselines (best-rougeL/ when the run
# evaluated Rouge-L)
SFT_ROW=$STUDENT_MODEL; [ -d "$S_DIR/best-rougeL" ] && SFT_ROW="$S_DIR/best-rougeL"
# minillm-generate resumes by itself: re-running appends only the missing records.
# Teacher samples for the train records only; the first GEN_DEV_NUM records go to SEQKD_DEV with their gold
# answers, the dev set that picks the SeqKD checkpoint (as the reference).
run "SeqKD data: teacher samples on the training prompts" \
  $GENERATE --model "$TEACHER_MODEL" --data "$GEN_DATA" --out "$SEQKD_DATA" \
  --dev-num "$GEN_DEV_NUM" --dev-out "$SEQKD_DEV" --no-progress $GEN_ARGS
done_already "$RUNS/kd/final" || run "KD baseline" \
  $TRAIN --config "$KD_CFG" output_dir="$RUNS/kd" teacher.path="$TEACHER_MODEL" $KD_ARGS
done_already "$RUNS/seqkd/final" || run "SeqKD baseline" \
  $TRAIN --config "$SEQKD_CFG" output_dir="$RUNS/seqkd" teacher.path="$TEACHER_MODEL" data.train="$SEQKD_DATA" \
  data.dev="$SEQKD_DEV" data.dev_num=0 $SEQKD_ARGS
done_already "$RUNS/minillm/final" || run "MiniLLM" \
  $TRAIN --config "$MINILLM_CFG" output_dir="$RUNS/minillm" student.path="$STUDENT_MODEL" \
  teacher.path="$TEACHER_MODEL" $MINILLM_ARGS $MINILLM_EXTRA
run "evaluate everything side by side" \
  $EVAL --model "$TEACHER_MODEL" "$SFT_ROW" "$(model_of "$RUNS/kd")" "$(model_of "$RUNS/seqkd")" \
  "$(model_of "$RUNS/minillm")" --name teacher SFT KD SeqKD MiniLLM --data $EVAL_DATA --seeds $SEEDS \
  --out "$RUNS/eval" --dtype auto --no-progress $EVAL_ARGS
}
echo; echo "pipeline: done. Table: $RUNS/eval/table.md, results: $RUNS/eval/results.json"
