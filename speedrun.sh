#!/usr/bin/env bash
# nanochat end to end: setup, then numbered stages that each read the previous stage's output from
# $NANOCHAT_BASE_DIR and append a section to the report card, then report.md.
#
# The profile is picked from the hardware (override with NANOCHAT_PROFILE=gpu8|gpu1|cpu):
#   gpu8  8 GPUs: depth-20 model on downloaded FineWeb-Edu (nanochat's reference run)
#   gpu1  1 GPU : the same, with gradient accumulation instead of 8 ranks
#   cpu   no GPU: a tiny model on text the package registries carry, done in well under an hour
# NANOCHAT_DATA=online|offline overrides where the pretraining text comes from.
# WANDB_RUN=name logs training to wandb (otherwise nothing goes over the network but data downloads).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export PYTHONUNBUFFERED=1
mkdir -p "$NANOCHAT_BASE_DIR"

bash dev/setup.sh
source .venv/bin/activate

if [ -z "${NANOCHAT_PROFILE:-}" ]; then
  ngpu=$( (nvidia-smi -L 2>/dev/null || true) | grep -c "^GPU" || true)
  if [ "$ngpu" -ge 8 ]; then NANOCHAT_PROFILE=gpu8; elif [ "$ngpu" -ge 1 ]; then NANOCHAT_PROFILE=gpu1; else NANOCHAT_PROFILE=cpu; fi
fi
case "$NANOCHAT_PROFILE" in
  gpu8) NPROC=8; DATA=online;  SHARDS=240; VOCAB=65536; TOK_CHARS=2000000000 ;;
  gpu1) NPROC=1; DATA=online;  SHARDS=240; VOCAB=65536; TOK_CHARS=2000000000 ;;
  cpu)  NPROC=1; DATA=offline; SHARDS=0;   VOCAB=4096;  TOK_CHARS=50000000 ;;
  *) echo "unknown NANOCHAT_PROFILE=$NANOCHAT_PROFILE (expected gpu8, gpu1 or cpu)" >&2; exit 1 ;;
esac
DATA="${NANOCHAT_DATA:-$DATA}"
WANDB_RUN="${WANDB_RUN:-dummy}"
echo "profile: $NANOCHAT_PROFILE (ranks: $NPROC, data: $DATA, base dir: $NANOCHAT_BASE_DIR)"

# run a stage on all ranks: torchrun when there are several, plain python otherwise
launch() {
  if [ "$NPROC" -gt 1 ]; then torchrun --standalone --nproc_per_node="$NPROC" -m "$@"; else python -m "$@"; fi
}
STAGE=0
stage() {
  STAGE=$((STAGE + 1)); local name="$1"; shift
  echo; echo "=== stage $STAGE: $name ==="
  local t0=$SECONDS
  "$@"
  echo "=== stage $STAGE: $name done in $((SECONDS - t0))s ==="
}

stage "report reset" python -m nanochat.report reset

# --- data -----------------------------------------------------------------------------------
DATA_PID=""
if [ "$DATA" = offline ]; then
  stage "pretraining shards (offline sources)" python -m nanochat.dataset --source offline
else
  # enough shards for the tokenizer now; the rest download in the background while it trains
  stage "pretraining shards (first 8)" python -m nanochat.dataset -n 8
  python -m nanochat.dataset -n "$SHARDS" > "$NANOCHAT_BASE_DIR/download.log" 2>&1 &
  DATA_PID=$!
fi

# --- tokenizer ------------------------------------------------------------------------------
stage "tokenizer training" python -m scripts.tok_train --max-chars="$TOK_CHARS" --vocab-size="$VOCAB"
stage "tokenizer evaluation" python -m scripts.tok_eval

if [ -n "$DATA_PID" ]; then
  echo "waiting for the shard download to finish (log: $NANOCHAT_BASE_DIR/download.log)"
  wait "$DATA_PID"
fi

stage "report" python -m nanochat.report generate
echo "done: $(pwd)/report.md"
