#!/usr/bin/env bash
# Sizes the claim sweeps: tokens/s of the small Gutenberg models (dense GLU and PEER) on one GPU,
# 300 steps each. Needs .deps/ and runs/data/gutenberg-bpe8k.h5 carried.
source "$(dirname "$0")/../gpu_common.sh"
gpu_build peerless
for d in 64 128 256 384; do
  l=$(( d <= 128 ? 4 : 6 )); mid=$(( l / 2 ))
  for mixer in glu peer; do
    extra=(); [[ $mixer == peer ]] && extra=(--set model.peer_blocks=\"$mid\" --set model.peer_n_sub=64 --set model.peer_heads=4 --set model.peer_topk=8 --set model.peer_key_dim=64)
    echo "== d $d L $l $mixer"
    timeout 120 $b train configs/claims/gutenberg-mmf.toml --set model.d_model=$d --set model.n_layers=$l \
      --set train.max_steps=300 --set run.name=probe-$d-$mixer --overwrite "${extra[@]}" 2>&1 | grep -E "trained|validation|error|memory" 
  done
done
