#!/usr/bin/env bash
# The LoRA vs full fine-tuning benchmark of bench/RESULTS.md (issue 19), on the CPU: pre-train the
# small base on the default byte-level text, generate the synthetic tasks, fine-tune it with LoRA and
# with full fine-tuning for the same steps, and score both (and the base) on held-out prompts.
# Usage: bash bench/lora/run.sh [OUT_DIR]   (env: PRETRAIN_MIN=8 FT_STEPS=1000 LORA_LR=1e-3 FULL_LR=1e-3
#        THREADS=2 PEERLESS=build/bin/peerless REUSE_BASE=0 MODEL="--set model.d_model=256 ..." for another base shape)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-runs/lora-bench}"
p="${PEERLESS:-build/bin/peerless}"
th="${THREADS:-2}" pre="${PRETRAIN_MIN:-8}" steps="${FT_STEPS:-1000}"
mkdir -p "$out"
read -r -a model <<< "${MODEL:-}"  # the base's shape, given to pre-training and both fine-tunings
common=(--set run.threads="$th" --set run.out_dir="$out" --set train.time_limit_minutes=0 "${model[@]}")
[[ -f runs/data/default-byte.h5 ]] || "$p" prepare --default --out runs/data/default-byte.h5
[[ ${REUSE_BASE:-0} == 1 && -f "$out/lora-base/model.h5" ]] ||  # REUSE_BASE=1: keep a finished base
"$p" train bench/lora/pretrain.toml "${common[@]}" --set train.time_limit_minutes="$pre" --set train.max_steps=100000 \
  --overwrite > "$out/pretrain.log" 2>&1
"$p" tasks 20000 --seed 1 --out "$out/train.jsonl" > /dev/null
"$p" tasks 200 --seed 2 --held-out --out "$out/held.jsonl" > /dev/null
"$p" prepare --format chat --input "$out/train.jsonl" --out "$out/tasks.h5" > /dev/null
ft() {  # name, extra --set flags
  local name=$1; shift
  "$p" finetune "$out/lora-base" bench/lora/finetune.toml "${common[@]}" --set data.path="$out/tasks.h5" \
    --set train.max_steps="$steps" --set train.log_every=100 --set run.name="$name" --overwrite "$@" > "$out/$name.log" 2>&1
  "$p" eval "$out/$name" --tasks "$out/held.jsonl" --max-new 24 > "$out/$name.eval" 2>&1
  grep -E "VmHWM|trainable|  all" "$out/$name.log" "$out/$name.eval"
}
"$p" eval "$out/lora-base" --tasks "$out/held.jsonl" --max-new 24 > "$out/base.eval" 2>&1
ft tasks-lora --set optim.lr="${LORA_LR:-1e-3}" --set optim.lr_min="${LORA_LR:-1e-3}"
ft tasks-full --set finetune.mode=full --set finetune.lora_rank=0 --set optim.lr="${FULL_LR:-1e-3}" \
  --set optim.lr_min="${FULL_LR:-1e-3}"
