#!/usr/bin/env bash
# A short GPU pass for the device tool when little device time is left (~8 min on an H100): build
# the GPU model's tests and run them in order of what they cover — the GPU model against the CPU
# model (every kind's loss curve), the config refusals, the sharded PEER layer under mpirun, the
# Q-Sparse fused kernels, ZeRO-1, then the multi-rank CLI runs — each bounded, logs under $OUT.
# Needs .deps/ carried. Usage: bash bench/gpu_quick.sh [SECONDS for the tests, default 300]
source "$(dirname "$0")/gpu_common.sh"
budget="${1:-300}"
gpu_build peerless test_model_cuda test_cuda_model_config test_peer_shard_cuda test_qsparse_fused_cuda test_zero1_cuda \
  test_peer_cuda test_pkm_cuda test_moe_cuda test_proj_cuda test_lora_cuda test_ops_attention_cuda
cd build-gpu
timeout "$budget" ctest -j 4 --timeout 240 -R "CudaModelCurve|CudaModelLora|lora_|cuda_model_config|peer_shard|qsparse|zero1|Cuda\.peer|Pkm|Moe|Proj|cli.test_gpu|attention_bf16" \
  -L gpu --output-on-failure > "$OUT/ctest_quick.log" 2>&1
echo "ctest rc=$?"
grep -E "tests passed|Failed|\*\*\*|Passed|Timeout" "$OUT/ctest_quick.log" | tail -60
