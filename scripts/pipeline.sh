#!/usr/bin/env bash
# Table 1 of the paper for one model family and student size, end to end, every command printed before it runs.
# Rows (as Table 1): teacher (SFT of the teacher), sft (SFT w/o KD; also MiniLLM's init), kd, seqkd (teacher samples,
# then SeqKD), minillm. Each row trains its model (skipped when done), then the rows are evaluated on the five sets at
# five seeds, and RUNS/table1.md shows our Rouge-L (mean ± std) beside the paper's.
#
#   bash scripts/pipeline.sh gpt2                      # every row, paper-era settings (GPUs, hours)
#   bash scripts/pipeline.sh gpt2 --rows teacher       # one row per command/job: the teacher first,
#   bash scripts/pipeline.sh gpt2 --rows "sft kd"      # then the others in any grouping; the table gathers them
#   bash scripts/pipeline.sh gpt2 --era current        # the current official recipes and decoding instead
#   bash scripts/pipeline.sh gpt2 --dry-run            # print the commands, run nothing
#   bash scripts/pipeline.sh gpt2 --tiny               # the whole chain on tests/assets in about a minute on CPU
#
# --era paper (the default; --paper is the same): what Table 1 was produced with. MiniLLM from
#   configs/minillm/paper/STUDENT.yaml (global batch 64, 256 rollouts per phase) and evaluation with
#   `minillm-eval --preset paper` (no n-gram block; OPT/LLaMA prompts start with BOS, i.e. --prompt-bos).
#   The default because this script exists to reproduce Table 1.
# --era current: configs/minillm/STUDENT.yaml and `--preset official-head` (no_repeat_ngram_size 6, no BOS), i.e.
#   the official code's current HEAD. Both eras: SFT, KD and SeqKD from configs/{sft,kd,seqkd}/; the SFT w/o KD, KD
#   and SeqKD rows evaluate best-rougeL/ (best dev Rouge-L, as the official README picks baselines), MiniLLM starts
#   from the SFT student's best-loss/ (best dev loss, as the README picks the init); SeqKD's teacher samples cover the
#   train records only and its dev set is Dolly's gold dev set.
# Options: --rows "ROWS" (space or comma separated; default all five), --era paper|current, --paper, --dry-run,
#   --tiny, --runs DIR (default runs/pipeline-FAMILY[-tiny]), --student STEM (recipe stem of the student;
#   gpt2-base, opt-1.3b, llama-7b by default), --teacher STEM (gpt2-xl, opt-13b, llama-13b), --seeds "..",
#   --force (re-run the selected rows' steps whose output exists; by default a finished step is skipped, so a
#   stopped pipeline continues where it stopped). kd and seqkd need the teacher row done, minillm the teacher and sft
#   rows: run those first (or in the same command). The teacher (RUNS/sft-teacher) and the SeqKD samples serve
#   every student size of the family; each student has its folder RUNS/STUDENT/ (sft, kd, seqkd, minillm), so
#   `--student gpt2-medium` with the same --runs adds a size. A command's rows are evaluated together into
#   RUNS/STUDENT/eval/ (every row) or RUNS/STUDENT/eval-ROWS/; RUNS/table1.md shows every size, each row taken from
#   the newest results.json that has it.
# Environment: TRAIN (default "python -m minillm.cli.train"; e.g. "deepspeed --num_gpus 8 -m minillm.cli.train"),
#   EVAL (default "python -m minillm.cli.eval"; e.g. "torchrun --nproc_per_node 8 -m minillm.cli.eval"; it runs
#   with --dtype auto: fp16 on GPUs, the paper protocol's precision, fp32 on CPU),
#   GENERATE (default "python -m minillm.cli.generate"), TABLE (default "python -m minillm.evaluation.table1").
#   MiniLLM's PT loss needs the packed corpus named in its config (data.pretrain); build it first with
#   `minillm-data --tokenizer gpt2 --pretrain ... --out ...`, or set MINILLM_EXTRA="minillm.ptx_coef=0".
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }
die() { echo "pipeline.sh: $*" >&2; exit 2; }
[ $# -ge 1 ] || usage 2
case $1 in -h|--help) usage 0 ;; -*) echo "pipeline.sh: the first argument is the family" >&2; usage 2 ;; esac
FAMILY=$1; shift
ALL_ROWS="teacher sft kd seqkd minillm"
TINY=0; RUNS=""; STUDENT=""; TEACHER=""; SEEDS=""; FORCE=0; ERA=paper; ROWS=$ALL_ROWS; DRY=0
while [ $# -gt 0 ]; do
  case $1 in
    --tiny) TINY=1 ;;
    --runs) RUNS=$2; shift ;;
    --student) STUDENT=$2; shift ;;
    --teacher) TEACHER=$2; shift ;;
    --seeds) SEEDS=$2; shift ;;
    --force) FORCE=1 ;;
    --era) ERA=$2; shift ;;
    --paper) ERA=paper ;;
    --rows) ROWS=${2//,/ }; shift ;;
    --dry-run) DRY=1 ;;
    -h|--help) usage 0 ;;
    *) echo "pipeline.sh: unknown option $1" >&2; usage 2 ;;
  esac
  shift
done
case $ERA in
  paper) PRESET=paper ;;
  current) PRESET=official-head ;;
  *) die "--era must be paper or current, got '$ERA'" ;;
esac
SELECTED=""  # the chosen rows in Table 1's order, whatever order they were given in
for r in $ROWS; do case " $ALL_ROWS " in *" $r "*) ;; *) die "--rows: unknown row '$r' (rows: $ALL_ROWS)" ;; esac; done
for r in $ALL_ROWS; do case " $ROWS " in *" $r "*) SELECTED="$SELECTED $r" ;; esac; done
SELECTED=${SELECTED# }
[ -n "$SELECTED" ] || die "--rows is empty (rows: $ALL_ROWS)"
has() { case " $SELECTED " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

TRAIN=${TRAIN:-python -m minillm.cli.train}
EVAL=${EVAL:-python -m minillm.cli.eval}
GENERATE=${GENERATE:-python -m minillm.cli.generate}
TABLE=${TABLE:-python -m minillm.evaluation.table1}
MINILLM_EXTRA=${MINILLM_EXTRA:-}

case $FAMILY in  # recipe stems; in --tiny the tiny models stand in for them (the table shows their paper rows)
  gpt2) TEACHER=${TEACHER:-gpt2-xl}; STUDENT=${STUDENT:-gpt2-base} ;;
  opt) TEACHER=${TEACHER:-opt-13b}; STUDENT=${STUDENT:-opt-1.3b} ;;
  llama) TEACHER=${TEACHER:-llama-13b}; STUDENT=${STUDENT:-llama-7b} ;;
  *) { [ "$TINY" = 1 ] || { [ -n "$TEACHER" ] && [ -n "$STUDENT" ]; }; } ||
       die "give --teacher and --student (recipe stems) for family $FAMILY" ;;
esac

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
  NOTE=""; [ -z "$STUDENT" ] || NOTE="Tiny run on tests/assets: tiny models stand in for $TEACHER and $STUDENT, so \
the paper's numbers are theirs, shown for the layout only."
else
  RUNS=${RUNS:-runs/pipeline-$FAMILY}
  SEEDS=${SEEDS:-10 20 30 40 50}
  SFT_T_CFG=configs/sft/$TEACHER.yaml; SFT_T_ARGS=""
  SFT_S_CFG=configs/sft/$STUDENT.yaml; SFT_S_ARGS=""
  KD_CFG=configs/kd/$STUDENT.yaml; SEQKD_CFG=configs/seqkd/$STUDENT.yaml
  if [ "$ERA" = paper ]; then MINILLM_CFG=configs/minillm/paper/$STUDENT.yaml; else MINILLM_CFG=configs/minillm/$STUDENT.yaml; fi
  for pair in "teacher $SFT_T_CFG" "sft $SFT_S_CFG" "kd $KD_CFG" "seqkd $SEQKD_CFG" "minillm $MINILLM_CFG"; do
    set -- $pair
    ! has "$1" || [ -f "$2" ] || die "missing recipe $2 for row $1 (see configs/)"
  done
  KD_ARGS=""; SEQKD_ARGS=""; MINILLM_ARGS=""
  GEN_DATA=dolly; GEN_ARGS=""
  GEN_DEV_NUM=1000  # Dolly's dev split, as the reference: gold answers, not teacher samples
  EVAL_DATA="dolly self_inst vicuna sinst uinst"; EVAL_ARGS="--dist"
  NOTE=""
fi

STEP=0
run() {  # run "description" cmd...: print the step and its command (copy-pastable), then run it unless --dry-run
  STEP=$((STEP + 1)); local what=$1; shift
  echo; echo "==> [$STEP] $what"; printf '   '; printf ' %q' "$@"; echo
  [ "$DRY" = 1 ] || "$@"
}
skip() { echo; echo "--- skipped (done: $2; --force re-runs it): $1"; }
done_already() { [ "$FORCE" = 0 ] && [ -e "$1" ]; }
# pick DIR KIND: the checkpoint a row uses: best-KIND/ (best dev Rouge-L or loss), else best/ (the recipe's
# select_best_by), else final/ (no dev evaluation); before training (--dry-run) the folder it will most likely be.
pick() { local d; for d in "$1/best$2" "$1/best" "$1/final"; do [ -d "$d" ] && { echo "$d"; return; }; done; echo "$1/best$2"; }
# needs ROW DIR WHAT: a row that is neither selected nor finished stops the run before anything is trained.
needs() {
  has "$1" || [ -e "$2/final" ] && return 0
  [ "$DRY" = 1 ] && { echo "note: $3 is not there yet ($2/final): run --rows $1 first"; return 0; }
  die "$3 is not there yet ($2/final): run --rows $1 first, or add it: --rows \"$1 $SELECTED\""
}

# The teacher and its SeqKD samples serve every student size of the family (Table 1 has one teacher per family);
# the rest lives in a folder per student, so the sizes' rows never mix and table1.md shows them all.
T_DIR=$RUNS/sft-teacher; SEQKD_DATA=$RUNS/seqkd-data/train.jsonl; SEQKD_DEV=$RUNS/seqkd-data/dev.jsonl
S_RUNS=$RUNS/${STUDENT:-student}; S_DIR=$S_RUNS/sft
if [ "$SELECTED" = "$ALL_ROWS" ]; then EVAL_DIR=$S_RUNS/eval; else EVAL_DIR=$S_RUNS/eval-${SELECTED// /-}; fi
if [ -f "$RUNS/teacher.txt" ] && [ "$(cat "$RUNS/teacher.txt")" != "${TEACHER:-teacher}" ]; then
  die "$RUNS holds the rows of teacher $(cat "$RUNS/teacher.txt"), not ${TEACHER:-teacher}: give another --runs"
fi
[ "$DRY" = 1 ] || { mkdir -p "$RUNS" && echo "${TEACHER:-teacher}" > "$RUNS/teacher.txt"; }
echo "pipeline: family $FAMILY$([ "$TINY" = 1 ] && echo ' (tiny)'), era $ERA (MiniLLM $MINILLM_CFG, eval preset" \
     "$PRESET), rows: $SELECTED, runs in $RUNS, seeds $SEEDS$([ "$DRY" = 1 ] && echo ', DRY RUN: nothing is run')"
if has kd || has seqkd || has minillm; then needs teacher "$T_DIR" "the SFT teacher"; fi
if has minillm; then needs sft "$S_DIR" "the SFT student (MiniLLM's init)"; fi

# shellcheck disable=SC2086  # the *_ARGS lists are meant to split into words
{
if has teacher; then
  if done_already "$T_DIR/final"; then skip "SFT teacher" "$T_DIR/final exists"
  else run "SFT teacher" $TRAIN --config "$SFT_T_CFG" output_dir="$T_DIR" $SFT_T_ARGS; fi
fi
TEACHER_MODEL=$(pick "$T_DIR" "")   # best/ by the teacher recipe's select_best_by
if has sft; then
  if done_already "$S_DIR/final"; then skip "SFT student" "$S_DIR/final exists"
  else run "SFT student (the MiniLLM init and the 'SFT w/o KD' row)" \
         $TRAIN --config "$SFT_S_CFG" output_dir="$S_DIR" $SFT_S_ARGS; fi
fi
INIT_MODEL=$(pick "$S_DIR" -loss)   # the MiniLLM init: best by dev loss
if has seqkd; then
  # minillm-generate resumes by itself: re-running appends only the missing records. Teacher samples for the
  # train records only; the first GEN_DEV_NUM records go to SEQKD_DEV with their gold answers, the dev set that
  # picks the SeqKD checkpoint (as the reference).
  run "SeqKD data: teacher samples on the training prompts" \
    $GENERATE --model "$TEACHER_MODEL" --data "$GEN_DATA" --out "$SEQKD_DATA" \
    --dev-num "$GEN_DEV_NUM" --dev-out "$SEQKD_DEV" --no-progress $GEN_ARGS
fi
if has kd; then
  if done_already "$S_RUNS/kd/final"; then skip "KD baseline" "$S_RUNS/kd/final exists"
  else run "KD baseline" $TRAIN --config "$KD_CFG" output_dir="$S_RUNS/kd" teacher.path="$TEACHER_MODEL" $KD_ARGS; fi
fi
if has seqkd; then
  if done_already "$S_RUNS/seqkd/final"; then skip "SeqKD baseline" "$S_RUNS/seqkd/final exists"
  else run "SeqKD baseline" $TRAIN --config "$SEQKD_CFG" output_dir="$S_RUNS/seqkd" teacher.path="$TEACHER_MODEL" \
         data.train="$SEQKD_DATA" data.dev="$SEQKD_DEV" data.dev_num=0 $SEQKD_ARGS; fi
fi
if has minillm; then
  if done_already "$S_RUNS/minillm/final"; then skip "MiniLLM" "$S_RUNS/minillm/final exists"
  else run "MiniLLM" $TRAIN --config "$MINILLM_CFG" output_dir="$S_RUNS/minillm" student.path="$INIT_MODEL" \
         teacher.path="$TEACHER_MODEL" $MINILLM_ARGS $MINILLM_EXTRA; fi
fi

# The evaluation of this command's rows: the baselines at their best dev Rouge-L, MiniLLM at best/ (its recipe
# selects by Rouge-L). Skipped when its results.json is newer than every model it evaluated.
MODELS=(); NAMES=()
has teacher && { MODELS+=("$TEACHER_MODEL"); NAMES+=(teacher); }
has sft && { MODELS+=("$(pick "$S_DIR" -rougeL)"); NAMES+=(SFT); }
has kd && { MODELS+=("$(pick "$S_RUNS/kd" -rougeL)"); NAMES+=(KD); }
has seqkd && { MODELS+=("$(pick "$S_RUNS/seqkd" -rougeL)"); NAMES+=(SeqKD); }
has minillm && { MODELS+=("$(pick "$S_RUNS/minillm" "")"); NAMES+=(MiniLLM); }
FRESH=0
if [ "$FORCE" = 0 ] && [ -f "$EVAL_DIR/results.json" ]; then
  FRESH=1; for m in "${MODELS[@]}"; do [ "$EVAL_DIR/results.json" -nt "$m" ] || FRESH=0; done
fi
if [ "$FRESH" = 1 ]; then skip "evaluation of: $SELECTED" "$EVAL_DIR/results.json is newer than its models"
else run "evaluate: ${NAMES[*]}" \
       $EVAL --model "${MODELS[@]}" --name "${NAMES[@]}" --data $EVAL_DATA --seeds $SEEDS --preset "$PRESET" \
       --out "$EVAL_DIR" --dtype auto --no-progress $EVAL_ARGS; fi

TABLE_ARGS=(--runs "$RUNS" --out "$RUNS/table1.md")
[ -n "$TEACHER" ] && TABLE_ARGS+=(--teacher "$TEACHER")
[ -n "$NOTE" ] && TABLE_ARGS+=(--note "$NOTE")
run "Table 1: ours beside the paper's" $TABLE "${TABLE_ARGS[@]}"
}
echo; echo "pipeline: done. Table 1: $RUNS/table1.md; this command's results: $EVAL_DIR/results.json"
