# Sourced by bench/gpu_check.sh, bench/gpu_prebuild.sh and bench/gpu_prebuilt.sh: what the GPU
# correctness pass builds: every tests/test_*_cuda.cpp binary (CMakeLists.txt labels their tests gpu,
# so a new file is picked up here too), the MPI GPU test, the binary the command-line GPU tests run,
# the planner's and the GPU config checks' tests, and the GEMM bench.
gpu_targets=(peerless test_peer_shard_cuda test_plan_device test_cuda_model_config bench_gemm_cuda)
for _f in "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"/tests/test_*_cuda.cpp; do
  gpu_targets+=("$(basename "$_f" .cpp)")
done
unset _f
