#!/usr/bin/env bash
# The GPU machine's checks of parallel.deterministic (docs/parallel.md), for the device tool (~8 min
# on an H100): build for sm_90, the fixed_point CPU-vs-CUDA test, cli.test_gpu_data_parallel (2 ranks
# sharing the GPU through the MPI backend must equal 1 rank x 2 accumulation bit for bit), and
# `peerless bench train` on the 370M config with deterministic off and on side by side. Logs under
# $OUT. Needs .deps/ carried (toml++ and pcre2 headers, shared data; see bench/gpu_train.sh).
# Usage: bash bench/gpu_deterministic.sh
source "$(dirname "$0")/gpu_common.sh"
gpu_build peerless test_ops_train_cuda
# The fixed-point op against its CPU reference, and 2 ranks on the GPU against 1 rank x 2 accumulation.
(cd build-gpu && ctest -L gpu -R "fixed_point|cli.test_gpu_data_parallel" --timeout 400 --output-on-failure \
  > "$OUT/ctest_gpu.log" 2>&1)
grep -E "tests passed|Passed|Failed|\*\*\*|deterministic|fast path|ok:" "$OUT/ctest_gpu.log" | head -20
# The mode's compute cost on one GPU: 370M, deterministic off and on side by side.
timeout 300 $b bench train --config configs/mmf-370m.toml --batch 8,16 --seq 2048 --steps 5 --warmup 2 \
  --deterministic both 2>&1 | tee "$OUT/bench_train_det.txt"
