#!/usr/bin/env bash
# A short check of the whole GPU path on any machine with 1..N GPUs, in a few minutes and without network:
# a small tokenizer, a d8 base_train for 50 steps under torchrun on every visible GPU (bf16, torch.compile),
# base_loss, 20 steps each of midtraining and SFT, chat_eval on 16 problems, engine decode tokens/s, and
# chat_web answering one OpenAI-client request. On CUDA, base_train also runs with --fp8, --fa3 and both (rows
# base_train_fp8, base_train_fa3, base_train_fp8_fa3: each says whether it ran or fell back, and its tok/s, MFU
# and peak memory beside the plain run's). Prints one table and exits non-zero if any stage failed.
#
#   bash dev/gpu_check.sh                      # CUDA, all visible GPUs
#   bash dev/gpu_check.sh --device cpu         # the same stages, tiny, on CPU (CI runs this)
#
# NANOCHAT_PY=python3 uses an interpreter that already has torch + nanochat's deps + rustbpe (skips setup);
# GPU_CHECK_DIR=DIR keeps the base dir and logs there (default: a temp folder, removed on success).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    *) echo "unknown argument $1 (expected --device cuda|cpu)" >&2; exit 2 ;;
  esac
done

PY="${NANOCHAT_PY:-.venv/bin/python}"
if ! "$PY" -c "import torch, rustbpe, nanochat" 2>/dev/null; then
  bash dev/setup.sh || { echo "setup failed" >&2; exit 1; }
  PY=.venv/bin/python
fi

WORK="${GPU_CHECK_DIR:-$(mktemp -d /tmp/nanochat_gpu_check.XXXXXX)}"
export NANOCHAT_BASE_DIR="$WORK/base" PYTHONUNBUFFERED=1
LOGS="$WORK/logs"
mkdir -p "$NANOCHAT_BASE_DIR" "$LOGS"
: > "$LOGS/stages.tsv"

if [ "$DEVICE" = cuda ]; then
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  [ "$NGPU" -ge 1 ] || { echo "no CUDA device visible (use --device cpu for the dry run)" >&2; exit 1; }
  DEPTH=8; T=2048; B=32; STEPS=50; VOCAB=16384; TOK_CHARS=40000000; MB=40; CHAT_STEPS=20; PROBLEMS=16; DECODE=128
  NUMERICS="--dtype=bfloat16 --compile=on"   # what the gpu profiles run
else
  NGPU=1; DEPTH=2; T=128; B=4; STEPS=6; VOCAB=512; TOK_CHARS=2000000; MB=3; CHAT_STEPS=3; PROBLEMS=4; DECODE=16
  NUMERICS="--dtype=float32 --compile=off"   # the dry run checks the plumbing, not the speed
fi
TOTAL=$((NGPU * B * T))
echo "gpu_check: device $DEVICE x $NGPU, work dir $WORK"

launch() {  # a stage on every device: torchrun when there are several
  if [ "$NGPU" -gt 1 ]; then "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m "$@"
  else "$PY" -m "$@"; fi
}
FAILED=0
stage() {  # stage NAME CMD...: run unless an earlier one failed; log, time and record it
  local name="$1"; shift
  if [ "$FAILED" = 1 ]; then printf "%s\tskip\t-\n" "$name" >> "$LOGS/stages.tsv"; return; fi
  echo "--- $name"
  local t0=$SECONDS
  if "$@" > "$LOGS/$name.log" 2>&1; then
    printf "%s\tok\t%s\n" "$name" $((SECONDS - t0)) >> "$LOGS/stages.tsv"
  else
    printf "%s\tFAIL\t%s\n" "$name" $((SECONDS - t0)) >> "$LOGS/stages.tsv"
    FAILED=1
    echo "$name failed; the end of its log ($LOGS/$name.log):" >&2
    tail -n 30 "$LOGS/$name.log" >&2
  fi
}
web_check() {  # chat_web on the device, one request through the OpenAI client, then stop it
  local port
  port=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  "$PY" -m scripts.chat_web --device-type "$DEVICE" --port "$port" --no-learn > "$LOGS/chat_web_server.log" 2>&1 &
  local pid=$!
  "$PY" dev/gpu_check.py web --port "$port"
  local rc=$?
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  return $rc
}

stage data "$PY" dev/gpu_check.py data "$NANOCHAT_BASE_DIR" --mb "$MB"
stage tok_train "$PY" -m scripts.tok_train --max-chars="$TOK_CHARS" --vocab-size="$VOCAB"
stage base_train launch scripts.base_train -- --depth="$DEPTH" --max-seq-len="$T" --device-batch-size="$B" \
  --total-batch-size="$TOTAL" --num-iterations="$STEPS" --eval-every=-1 --eval-tokens="$((TOTAL * 2))" \
  --sample-every=-1 --device-type="$DEVICE" $NUMERICS
if [ "$DEVICE" = cuda ]; then  # the GPU-only options, each against the plain run above (own tags: base_loss and
  # the chat stages read the plain model); a profile turns one on only after its row here is ok and faster
  for flags in "--fp8" "--fa3" "--fp8 --fa3"; do
    tag=${flags//--/}; tag=${tag// /_}  # fp8, fa3, fp8_fa3
    stage "base_train_$tag" launch scripts.base_train -- --depth="$DEPTH" --max-seq-len="$T" \
      --device-batch-size="$B" --total-batch-size="$TOTAL" --num-iterations="$STEPS" --eval-every=-1 \
      --eval-tokens="$((TOTAL * 2))" --sample-every=-1 --device-type="$DEVICE" $NUMERICS $flags --model-tag="check_$tag"
  done
fi
stage base_loss launch scripts.base_loss -- --device-batch-size="$B" --split-tokens="$((TOTAL * 2))" --device-type="$DEVICE"
# chat stages on the synthetic GSM8K problems alone: the one chat task that needs no downloaded data
CHAT="--mixture=gsm8k --max-seq-len=$T --device-type=$DEVICE --num-iterations=$CHAT_STEPS --val-examples=32 $NUMERICS"
stage mid_train launch scripts.mid_train -- $CHAT --device-batch-size="$B" --total-batch-size="$TOTAL" \
  --eval-every=-1 --eval-tokens="$TOTAL"
stage chat_sft launch scripts.chat_sft -- $CHAT --device-batch-size=4 --examples-per-step="$((NGPU * 4))" \
  --eval-every=-1 --eval-mc=
stage chat_eval launch scripts.chat_eval -- -i sft --task-file="$NANOCHAT_BASE_DIR/gpu_check_eval.jsonl" \
  -x "$PROBLEMS" -m 64 --device-type="$DEVICE"
stage decode "$PY" dev/gpu_check.py decode --device "$DEVICE" --tokens "$DECODE"
stage chat_web web_check

"$PY" dev/gpu_check.py table "$LOGS" "$NANOCHAT_BASE_DIR"
rc=$?
if [ "$rc" = 0 ] && [ -z "${GPU_CHECK_DIR:-}" ]; then rm -rf "$WORK"; else echo "logs: $LOGS"; fi
exit $rc
