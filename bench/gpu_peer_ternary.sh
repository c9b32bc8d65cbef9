#!/usr/bin/env bash
# model.peer_ternary on the GPU, in one device call (~6 min on an H100): build, then the tests that
# cover it (the expert kernels reading int8 codes against the fp32 kernels and the CPU, the segment
# sums behind β, the 50-step loss curve and the refresh against the CPU's β and codes, the refusals
# and the planner, the sharded runner under mpirun -np 2) and `peerless bench peer-layer` with fp32
# and with --ternary tables on the same warm machine, so the two tables compare. Logs under $OUT.
# Needs .deps/ carried. Usage: bash bench/gpu_peer_ternary.sh
source "$(dirname "$0")/gpu_common.sh"
gpu_build peerless test_peer_cuda test_ops_cuda test_model_cuda test_cuda_model_config test_plan_device \
  test_peer_shard_cuda
cd build-gpu
timeout 360 ctest -j 2 --timeout 300 --output-on-failure \
  -R "Cuda\.peer_|segment_abs_sums|weight_quant|CudaModelCurve.*peer|CudaModelPeerTernary|cuda_model_config|PlanDevice|peer_shard_cuda" \
  > "$OUT/ctest_peer_ternary.log" 2>&1
echo "ctest rc=$?"
grep -E "tests passed|Failed|\*\*\*|Timeout" "$OUT/ctest_peer_ternary.log" | tail -30
grep -E "^step|max relative|gradient norm|evaluation of" "$OUT/ctest_peer_ternary.log" | tail -20
cd ..
echo "== bench peer-layer (fp32 tables)"
timeout 200 $b bench peer-layer 2>&1 | tee "$OUT/bench_peer_layer.txt" | tail -24
echo "== bench peer-layer --ternary"
timeout 200 $b bench peer-layer --ternary 2>&1 | tee "$OUT/bench_peer_layer_ternary.txt" | tail -26
