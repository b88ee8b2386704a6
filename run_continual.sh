#!/usr/bin/env bash
# Continual learning: starting from the chat model, learn a sequence of tasks with each of the
# seven strategies (naive, replay, ewc, lora, ssr, merge, olora), then write the report's "Continual learning" section
# (R matrices, comparison table, heat map) and regenerate report.md. Run it after speedrun.sh.
#
#   bash run_continual.sh                      # sft model, the profile's default sequence(s)
#   bash run_continual.sh -i rl                # start from the RL model instead (base, mid, sft, rl)
#   bash run_continual.sh -s chat-tasks        # another sequence (tasks/sequences/*.json or a path; a,b for several)
#   bash run_continual.sh -t naive,lora        # only some strategies
#   NANOCHAT_RESUME=1 bash run_continual.sh    # keep strategies already finished with the same settings
#
# The profile (NANOCHAT_PROFILE=gpu8|gpu1|cpu, else picked from the hardware as in speedrun.sh) sets the
# sizes and the default sequences. cpu: lm-domains, 40 steps x 4 rows x 256 tokens per task, about
# 13 minutes for all seven strategies on 2 cores. GPU: lm-domains and chat-tasks, 200 steps x 16 rows.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export PYTHONUNBUFFERED=1
if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi

SOURCE=sft
SEQUENCES=""
STRATEGIES=naive,replay,ewc,lora,ssr,merge,olora
while getopts "i:s:t:h" opt; do
  case "$opt" in
    i) SOURCE="$OPTARG" ;;
    s) SEQUENCES="$OPTARG" ;;
    t) STRATEGIES="$OPTARG" ;;
    *) sed -n '2,14p' "$0"; exit 1 ;;
  esac
done

if [ -z "${NANOCHAT_PROFILE:-}" ]; then
  ngpu=$( (nvidia-smi -L 2>/dev/null || true) | grep -c "^GPU" || true)
  if [ "$ngpu" -ge 1 ]; then NANOCHAT_PROFILE=gpu1; else NANOCHAT_PROFILE=cpu; fi
fi
case "$NANOCHAT_PROFILE" in
  gpu8|gpu1)
    # one process on one GPU: the sequences are small; more steps and rows per task than on CPU
    SEQUENCES="${SEQUENCES:-lm-domains,chat-tasks}"
    FLAGS="--steps=200 --batch-size=16 --seq-len=512 --eval-rows=128 --eval-examples=200 --replay-size=1024 --ssr-samples=512 --ssr-len=256 --ewc-samples=128" ;;
  cpu)
    SEQUENCES="${SEQUENCES:-lm-domains}"
    FLAGS="--steps=40 --batch-size=4 --seq-len=256 --eval-rows=32 --eval-examples=50"
    # two OpenMP threads on two cores that anything else also uses stall at every barrier; one thread
    # loses little at this size and never stalls (set OMP_NUM_THREADS yourself to override)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" ;;
  *) echo "unknown NANOCHAT_PROFILE=$NANOCHAT_PROFILE (expected gpu8, gpu1 or cpu)" >&2; exit 1 ;;
esac
RESUME=""
if [ "${NANOCHAT_RESUME:-0}" = 1 ]; then RESUME="--resume"; fi
echo "continual learning: profile $NANOCHAT_PROFILE, model $SOURCE, sequences $SEQUENCES, strategies $STRATEGIES"

names=""
IFS=',' read -ra SEQS <<< "$SEQUENCES"
for seq in "${SEQS[@]}"; do
  t0=$SECONDS
  echo; echo "=== continual_train: $seq ==="
  python -m scripts.continual_train -i "$SOURCE" --sequence "$seq" --strategies "$STRATEGIES" --save-adapters $FLAGS $RESUME
  echo "=== $seq done in $((SECONDS - t0))s ==="
  name=$(python -c "import sys; from tasks.continual import load_sequence_spec; print(load_sequence_spec(sys.argv[1])['name'])" "$seq")
  names="${names:+$names,}$name"
done

python -m scripts.continual_eval --sequences "$names"
python -m nanochat.report generate
echo "done: $(pwd)/report.md (section: Continual learning)"
