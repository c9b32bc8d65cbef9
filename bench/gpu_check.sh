#!/usr/bin/env bash
# The GPU machine's correctness pass, for the device tool (~5 min on an H100): build the CUDA tests
# for sm_90 and run every test labelled gpu (CPU-vs-CUDA ops, the GPU model against the CPU model,
# 2 ranks sharing the GPU through the MPI backend). Logs under $OUT. Needs .deps/ carried.
# Usage: bash bench/gpu_check.sh
source "$(dirname "$0")/gpu_common.sh"
gpu_build peerless test_ops_cuda test_ops_train_cuda test_fused_cuda test_model_cuda test_peer_cuda test_cuda_model_config \
  test_ops_attention_cuda test_qsparse_fused_cuda test_zero1_cuda test_peer_shard_cuda test_proj_cuda test_plan_device test_pkm_cuda test_moe_cuda \
  test_lora_cuda test_import_llama_cuda
(cd build-gpu && ctest -L gpu -j 4 --timeout 400 --output-on-failure > "$OUT/ctest_gpu.log" 2>&1)
grep -E "tests passed|Failed|\*\*\*" "$OUT/ctest_gpu.log" | head -30
