#!/usr/bin/env bash
# The small-scale claims (docs/scaling.md) on the GPU machine, through `peerless sweep`: the PEER
# isoFLOP sweep (C1), the WSD branches and their cosine controls (C5) on the GPU with 4 one-rank
# groups packed on it, and CPU-only sweeps (CPU_SWEEPS, default the MatMul-free vs Transformer++
# ladder C3; qsparse for C2) on the host's cores beside them. Each sweep is
# resumable: the command stops them (SIGTERM: checkpoint, exit 0) before the device call's limit, and
# the next call continues where they stopped while the machine stays warm. Results (results.csv,
# metrics, point.json, logs; no checkpoints) go to $OUT/claims.tar.gz after every call.
# Needs .deps/ and runs/data/gutenberg-bpe8k.h5 carried. Usage: bash bench/claims/gpu_claims.sh [SECONDS for the whole call, default 540]
source "$(dirname "$0")/../gpu_common.sh"
t0=$(date +%s)
gpu_build peerless
budget=$(( ${1:-540} - ($(date +%s) - t0) - 30 ))  # the sweeps' share of SECONDS: the build and the copy-out come off it
sweep() {  # NAME RANKS [MPIRUN ARGS]: run bench/claims/NAME.toml into runs/claims/NAME until the budget is spent
  timeout -s TERM "$budget" mpirun --oversubscribe -np "$2" "${@:3}" "$b" sweep run "bench/claims/$1.toml" \
    --dir "runs/claims/$1" > "$OUT/sweep_$1.log" 2>&1
  echo "$1: exit $?"
}
start=$(date +%s)
cpu_sweeps() {  # on the host's cores beside the GPU sweeps: 3 ranks of 4 threads
  for s in ${CPU_SWEEPS:-mmf_vs_tpp}; do
    left=$((budget - ($(date +%s) - start)))
    ((left > 20)) || break
    # No GPU visible: the trainer's backend "auto" then picks MPI (NCCL refuses ranks sharing a GPU).
    CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=4 budget=$left sweep "$s" 3 --bind-to none -x OMP_NUM_THREADS -x CUDA_VISIBLE_DEVICES
  done
}
cpu_sweeps &
cpu=$!
for s in peer_isoflop wsd_branches cosine_controls; do
  left=$((budget - ($(date +%s) - start)))
  ((left > 20)) || break
  budget=$left sweep "$s" 4
done
wait $cpu
for s in mmf_vs_tpp qsparse peer_isoflop wsd_branches cosine_controls; do
  [[ -d runs/claims/$s ]] || continue
  $b sweep collect "runs/claims/$s" > /dev/null 2>&1
  $b sweep status "runs/claims/$s" | tail -4
done
# One archive (the device tool returns a limited number of files): everything but checkpoints.
(cd runs && find claims -name checkpoints -prune -o -type f -print0 | tar --null -czf "$OUT/claims.tar.gz" -T -)
