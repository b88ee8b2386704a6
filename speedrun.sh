#!/usr/bin/env bash
# nanochat end to end: setup, then numbered stages that each read the previous stage's output from
# $NANOCHAT_BASE_DIR and append a section to the report card, then report.md.
#
# The profile is picked from the hardware (override with NANOCHAT_PROFILE=gpu8|gpu1|cpu):
#   gpu8  8 GPUs: depth-20 model on downloaded FineWeb-Edu (nanochat's reference run)
#   gpu1  1 GPU : the same, with gradient accumulation instead of 8 ranks -- 8x the time: base training alone
#         is ~21k steps of 8 micro-steps, about a day on one H100 (resumable: NANOCHAT_RESUME=1)
#   cpu   no GPU: a tiny model on text the package registries carry, done in well under an hour
# NANOCHAT_DATA=online|offline overrides where the pretraining text comes from; NANOCHAT_DATA_SOURCE=climbmix
# downloads ClimbMix instead of FineWeb-Edu (upstream's 2026 data; not yet run here, see README).
# NANOCHAT_BASE_EXTRA="--fp8 --fa3" adds flags to base training (both unverified on our GPUs: dev/gpu_check.sh).
# NANOCHAT_ALIGN=rl|dpo|both picks how the SFT model is aligned: RL (GRPO, the default), DPO on
# on-policy pairs from checkable problems, or both (each from the SFT model, evaluated side by side).
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
# Same code under every profile; only these flags differ.
case "$NANOCHAT_PROFILE" in
  gpu8|gpu1)
    NPROC=${NANOCHAT_PROFILE#gpu}; DATA=online; SHARDS=240; VOCAB=65536; TOK_CHARS=2000000000
    # depth 20 at Chinchilla 20 tokens/param; gpu1 gets the same total batch by accumulation
    # periodic checkpoints (the last two kept) give NANOCHAT_RESUME=1 something to resume after a crash
    BASE_TRAIN="--depth=20 --device-batch-size=32 --total-batch-size=524288 --save-every=1000 --keep-last=2"
    BASE_LOSS="--split-tokens=10485760"
    BASE_EVAL="--max-per-task=-1"
    MID_TRAIN="--device-batch-size=32 --total-batch-size=524288 --save-every=200 --keep-last=2"
    CHAT_SFT="--device-batch-size=4 --examples-per-step=32 --save-every=200 --keep-last=2"
    CHAT_RL="--device-batch-size=8"
    CHAT_DPO="--device-batch-size=8"
    CHAT_EVAL=""
    COPY_STEPS=0 ;;
  cpu)
    NPROC=1; DATA=offline; SHARDS=0; VOCAB=4096; TOK_CHARS=50000000
    # a tiny model for a fixed number of steps: 20 tokens/param would take hours on 2 cores. Value embeddings: at
    # vocab 4096 their tables cost nothing measurable per step and take 0.038 off val bpb (dev/notes_recipe.md);
    # the GPU profiles wait for a GPU run (at vocab 65,536 d20's tables are 839M parameters of optimizer memory).
    # A --model-options in NANOCHAT_BASE_EXTRA replaces this one.
    DEPTH=4
    BASE_TRAIN="--depth=$DEPTH --model-options=value_embeds=1 --max-seq-len=512 --device-batch-size=8 --total-batch-size=8192 --num-iterations=${CPU_BASE_STEPS:-200} --eval-every=50 --eval-tokens=65536 --sample-every=100 --save-every=50 --keep-last=2"
    BASE_LOSS="--split-tokens=65536 --device-batch-size=8"
    BASE_EVAL="--max-per-task=50"
    # chat stages: a few minutes each; the mixtures are capped so rendering them stays cheap
    MID_TRAIN="--max-seq-len=512 --device-batch-size=8 --total-batch-size=8192 --num-iterations=${CPU_MID_STEPS:-100} --max-per-task=1000 --mc-per-task=1000 --val-examples=200 --eval-every=50 --eval-tokens=16384"
    CHAT_SFT="--max-seq-len=512 --device-batch-size=4 --examples-per-step=8 --num-iterations=${CPU_SFT_STEPS:-150} --max-per-task=400 --val-examples=100 --eval-every=50 --eval-mc-every=75 --eval-mc-examples=100"
    CHAT_RL="--num-steps=${CPU_RL_STEPS:-30} --prompts-per-step=4 --num-samples=8 --max-new-tokens=128 --eval-every=-1 --eval-problems=32 --eval-samples=4 --save-every=-1"
    # DPO samples as many answers as RL does (120 problems x 8 = 30 steps x 4 x 8)
    CHAT_DPO="--num-problems=120 --num-samples=8 --max-new-tokens=128 --pairs-per-step=8 --num-epochs=2 --eval-problems=32 --eval-samples=4"
    CHAT_EVAL="--max-problems=128 --max-new-tokens=128"
    # a copy-only drill before midtraining (tasks/tools.py CopyDrill; CPU_COPY_STEPS steps, 300 by default, ~5 min;
    # 0 turns it off), which then starts from it: the d4 model learns to copy questions into tool calls and
    # outputs into answers, without which the tools cannot help it (after SFT: math 21/24 with tools vs 0
    # without, facts 6/24 vs 0). The mid mixture after it keeps `copy` (without it the facts' copying was lost).
    COPY_STEPS=${CPU_COPY_STEPS:-300}
    MID_AFTER_COPY="chitchat,chatterbot,mc,gsm8k,spellingbee,simplespelling,tools,copy" ;;
  *) echo "unknown NANOCHAT_PROFILE=$NANOCHAT_PROFILE (expected gpu8, gpu1 or cpu)" >&2; exit 1 ;;
esac
DATA="${NANOCHAT_DATA:-$DATA}"
ALIGN="${NANOCHAT_ALIGN:-rl}"
case "$ALIGN" in rl|dpo|both) ;; *) echo "unknown NANOCHAT_ALIGN=$ALIGN (expected rl, dpo or both)" >&2; exit 1 ;; esac
# online data: the real CORE (DCLM bundle) and nanochat's chat recipe (SmolTalk, MMLU, GSM8K train)
ONLINE=""; [ "$DATA" = online ] && ONLINE="--online"
WANDB_RUN="${WANDB_RUN:-dummy}"
echo "profile: $NANOCHAT_PROFILE (ranks: $NPROC, data: $DATA, alignment: $ALIGN, base dir: $NANOCHAT_BASE_DIR)"
[ "$NANOCHAT_PROFILE" = gpu1 ] && echo "gpu1: the depth-20 run on one GPU takes about a day (base training ~21k steps x 8 micro-steps on an H100); it checkpoints every 1000 steps and NANOCHAT_RESUME=1 continues"

# run a stage on all ranks: torchrun when there are several, plain python otherwise
launch() {
  if [ "$NPROC" -gt 1 ]; then torchrun --standalone --nproc_per_node="$NPROC" -m "$@"; else python -m "$@"; fi
}
# NANOCHAT_RESUME=1 bash speedrun.sh continues a killed run: training stages resume from their last
# checkpoint (a stage that had finished just re-saves). Otherwise each stage starts fresh.
# resume_flag STAGE [TAG]: a stage that writes two tags (the copy drill, then midtraining) resumes each on its own
resume_flag() {
  if [ "${NANOCHAT_RESUME:-0}" = 1 ] && ls "$NANOCHAT_BASE_DIR/$1_checkpoints"/${2:-*}/meta_*.json >/dev/null 2>&1; then echo "--resume"; fi
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
  stage "pretraining shards (offline sources)" python -m nanochat.offline
else
  # enough shards for the tokenizer now; the rest download in the background while it trains
  SOURCE="--source=${NANOCHAT_DATA_SOURCE:-fineweb-edu}"
  stage "pretraining shards (first 8)" python -m nanochat.dataset -n 8 "$SOURCE"
  python -m nanochat.dataset -n "$SHARDS" "$SOURCE" > "$NANOCHAT_BASE_DIR/download.log" 2>&1 &
  DATA_PID=$!
fi

# --- tokenizer ------------------------------------------------------------------------------
stage "tokenizer training" python -m scripts.tok_train --max-chars="$TOK_CHARS" --vocab-size="$VOCAB"
stage "tokenizer evaluation" python -m scripts.tok_eval

if [ -n "$DATA_PID" ]; then
  echo "waiting for the shard download to finish (log: $NANOCHAT_BASE_DIR/download.log)"
  wait "$DATA_PID"
fi

# --- search index for the search tool (training shards + the invented facts of the tool tasks) ------------
stage "search index" python -m scripts.build_index --shards --facts --max-docs=200000

# --- base model -----------------------------------------------------------------------------
stage "base model training" launch scripts.base_train -- $BASE_TRAIN ${NANOCHAT_BASE_EXTRA:-} --run="$WANDB_RUN" $(resume_flag base)
stage "base model loss" launch scripts.base_loss -- $BASE_LOSS
stage "base model evaluation (CORE)" launch scripts.base_eval -- $BASE_EVAL $ONLINE

# --- chat model -----------------------------------------------------------------------------
if [ "$COPY_STEPS" -gt 0 ]; then
  # its own tag (not d<N>, so no later stage picks it up); midtraining then continues from its weights
  stage "copy drill (before midtraining)" launch scripts.mid_train -- $MID_TRAIN --mixture=copy --max-per-task=-1 \
    --num-iterations="$COPY_STEPS" --save-tag=copydrill --run="$WANDB_RUN" $(resume_flag mid copydrill)
  stage "midtraining" launch scripts.mid_train -- $MID_TRAIN $ONLINE --source=mid --model-tag=copydrill \
    --mixture="$MID_AFTER_COPY" --save-tag="d$DEPTH" --run="$WANDB_RUN" $(resume_flag mid "d$DEPTH")
else
  stage "midtraining" launch scripts.mid_train -- $MID_TRAIN $ONLINE --run="$WANDB_RUN" $(resume_flag mid)
fi
stage "chat evaluation (mid)" launch scripts.chat_eval -- -i mid $CHAT_EVAL
stage "supervised finetuning" launch scripts.chat_sft -- $CHAT_SFT $ONLINE --run="$WANDB_RUN" $(resume_flag chatsft)
stage "chat evaluation (sft)" launch scripts.chat_eval -- -i sft $CHAT_EVAL
if [ "$ALIGN" != dpo ]; then
  stage "reinforcement learning" launch scripts.chat_rl -- $CHAT_RL $ONLINE
  stage "chat evaluation (rl)" launch scripts.chat_eval -- -i rl $CHAT_EVAL
fi
if [ "$ALIGN" != rl ]; then
  stage "preference learning (DPO)" launch scripts.chat_dpo -- $CHAT_DPO $ONLINE $(resume_flag chatdpo)
  stage "chat evaluation (dpo)" launch scripts.chat_eval -- -i dpo $CHAT_EVAL
fi

stage "report" python -m nanochat.report generate
echo "done: $(pwd)/report.md"
echo "talk to your model: python -m scripts.chat_cli   (or in a browser: python -m scripts.chat_web)"
echo "keep it learning: bash run_continual.sh"
