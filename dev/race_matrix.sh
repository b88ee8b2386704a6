#!/usr/bin/env bash
# The race matrix of issue 27 (dev/notes_recipe.md): ours before the recipe, each piece alone, every piece
# together, the pieces the smoke race favoured, and nanochat master in bf16, at d4 for 10 minutes and d8 for
# 20 minutes each, one side after another.
# Run it on a quiet machine (nothing else training: the budget is wall time), from the repo root:
#
#     bash dev/race_matrix.sh /path/to/nanochat-master            # both depths (~10 h on 2 cores)
#     DEPTHS=4 bash dev/race_matrix.sh /path/to/nanochat-master    # d4 only (~3.5 h)
#
# Each depth prints its table and writes $NANOCHAT_BASE_DIR/race/results_<time>.json; paste both into
# dev/notes_recipe.md. A piece stays on only where it lowers val bpb at equal time at d4 and d8.
set -euo pipefail
REF=${1:?usage: bash dev/race_matrix.sh /path/to/nanochat-checkout}
PY=${PYTHON:-.venv/bin/python}
DEPTHS=${DEPTHS:-"4 8"}

# every piece at once: the model's and Muon's (window_pattern is raced on its own: on CPU it only costs time)
ALL="value_embeds=1,resid_scalars=1,smear=1,backout=1,qk_gain=1.44,rope_base=100000,embed_init_std=0.8,fc_init_scale=0.4,polar_express=1,normuon=1,muon_weight_decay=0.1"
# the pieces the per-step smoke race favoured (dev/notes_recipe.md): the candidate default
FAVOURED="value_embeds=1,qk_gain=1.44,rope_base=100000,embed_init_std=0.8,fc_init_scale=0.4"
# ours before the recipe: base_train's RECIPE settings (scripts/base_train.py) back at GPTConfig's plain values
PLAIN="qk_gain=1.0,rope_base=10000,embed_init_std=1.0,fc_init_scale=1.0"
SIDES=(
  "ours --model-options $PLAIN"
  "ours"
  "ours --model-options value_embeds=1"
  "ours --model-options resid_scalars=1"
  "ours --model-options smear=1"
  "ours --model-options backout=1"
  "ours --model-options window_pattern=SSSL"
  "ours --model-options softcap=20"
  "ours --model-options polar_express=1"
  "ours --model-options normuon=1"
  "ours --model-options muon_weight_decay=0.1"
  "ours --model-options $ALL"
  "ours --model-options $FAVOURED"
  "ref-bf16"
)
# what each piece costs per step (interleaved, so the two halves of "faster to a loss" come from the same machine)
"$PY" -m dev.bench_recipe --depth 4 --seq-len 512
for d in $DEPTHS; do
  case $d in
    4) MIN=10 ;;
    8) MIN=20 ;;
    *) MIN=${MINUTES:?set MINUTES for depth $d} ;;
  esac
  echo "=== d$d, $MIN minutes per side ==="
  "$PY" -m dev.bench_race --ref "$REF" --depth "$d" --seq-len 512 --batch-tokens 8192 --minutes "$MIN" \
    --sides "${SIDES[@]}"
done
