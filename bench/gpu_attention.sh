#!/usr/bin/env bash
# The attention kernels on the GPU machine (device tool, .deps/ carried; ~4 min on an H100): build,
# the CPU-vs-CUDA attention tests (fp32 and bf16 kernels), then `peerless bench attention` (both
# kernels) and its anchor, torch SDPA at the same shapes, in the same job (bench/attention_torch.py).
# Logs and tables under $OUT.
source "$(dirname "$0")/gpu_common.sh"
gpu_build peerless test_ops_attention_cuda test_ops_attention
build-gpu/bin/test_ops_attention_cuda > "$OUT/test_ops_attention_cuda.log" 2>&1; echo "attention cuda tests rc=$?"
tail -3 "$OUT/test_ops_attention_cuda.log"
$b bench attention | tee "$OUT/bench_attention.txt"
python3 bench/attention_torch.py 2>&1 | tee "$OUT/attention_torch.txt"
