#!/usr/bin/env bash
# The GPU machine's correctness pass, for the device tool (~5 min on an H100): build the CUDA tests
# for sm_90 and run every test labelled gpu (CPU-vs-CUDA ops, the GPU model against the CPU model,
# 2 ranks sharing the GPU through the MPI backend). Logs under $OUT. Needs .deps/ carried.
# Usage: bash bench/gpu_check.sh
source "$(dirname "$0")/gpu_common.sh"
source "$(dirname "$0")/gpu_targets.sh"
gpu_build "${gpu_targets[@]}"
(cd build-gpu && ctest -L gpu -j 4 --timeout 400 --output-on-failure > "$OUT/ctest_gpu.log" 2>&1)
grep -E "tests passed|Failed|\*\*\*" "$OUT/ctest_gpu.log" | head -30
