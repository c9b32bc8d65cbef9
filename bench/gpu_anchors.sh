#!/usr/bin/env bash
# Issue 20's anchors and peerless side by side in one job on the GPU machine (device tool): the reference MatMul-free LM (ridgerchu/matmulfreellm, Triton) trained at the 370M
# config, T 2048, batch 8 and 16, and lucidrains/PEER-pytorch's PEER layer at d 1024, N = 1024²,
# h 8, k 16, 8192 tokens (bench/anchors.py), then `peerless bench train` on the same config and
# `peerless bench peer-layer`. Logs and tables under $OUT (the anchors' JSON lines in anchor_*.txt).
# The build for sm_90 takes minutes; if one device call's 10 minutes do not hold it all, run
# --skip-peerless then --skip-anchors on the same warm machine (the build is kept).
#
# The anchors are git-ignored snapshots (never committed) in <repo>/.anchors/matmulfreellm and
# <repo>/.anchors/PEER-pytorch: carry ".anchors" to the GPU machine with ".deps" (toml++ and pcre2
# headers, shared data), e.g. run(command="bash bench/gpu_anchors.sh", carry=[".deps", ".anchors"]).
# bench/anchors.py patches only that copy (Triton 3.x round, an einx stand-in). Usage:
#   bash bench/gpu_anchors.sh [--skip-anchors] [--skip-peerless]
source "$(dirname "$0")/gpu_common.sh"
anchors=1 ours=1
for a in "$@"; do
  [[ $a == --skip-anchors ]] && anchors=0
  [[ $a == --skip-peerless ]] && ours=0
done
if [[ $anchors == 1 ]]; then
  [[ -d .anchors/matmulfreellm && -d .anchors/PEER-pytorch ]] || {
    echo "no .anchors/matmulfreellm or .anchors/PEER-pytorch here: carry .anchors with the working tree"; exit 1; }
  echo "== anchor: ridgerchu/matmulfreellm, 370M, T 2048"
  PYTHONUNBUFFERED=1 timeout 300 python3 bench/anchors.py mmfreelm --config configs/mmf-370m.toml --batch 8,16 \
    --seq 2048 2>&1 | tee "$OUT/anchor_mmfreelm.txt" | grep -v '^{'
  echo "== anchor: lucidrains/PEER-pytorch, one PEER layer, 8192 tokens"
  PYTHONUNBUFFERED=1 timeout 150 python3 bench/anchors.py peer --batch 4 --seq 2048 2>&1 \
    | tee "$OUT/anchor_peer.txt" | grep -v '^{'
fi
if [[ $ours == 1 ]]; then
  gpu_build peerless
  echo "== peerless bench train (370M)"
  timeout 300 $b bench train --config configs/mmf-370m.toml --batch 8,16 --seq 2048 2>&1 | tee "$OUT/bench_train.txt"
  echo "== peerless bench peer-layer"
  timeout 200 $b bench peer-layer 2>&1 | tee "$OUT/bench_peer_layer.txt" | tail -30
fi
