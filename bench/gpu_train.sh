#!/usr/bin/env bash
# One command for the GPU machine (the device tool) for the CUDA training path: build for sm_90,
# run the GPU tests (ctest -L gpu: op tests and the 50-step GPU-vs-CPU loss curves), `peerless bench
# train` on the 370M config, `peerless bench ops`, `peerless bench peer-layer` (fp32, --ternary
# and --ternary-int8 tables), 1-GPU training runs on Tiny Shakespeare (the dense demo and its PEER variant), and the PyTorch baseline
# (bench/torch_mmf.py) when asked. Logs under $OUT. The whole thing is ~15 min on an H100: more than
# one device call allows, so split it (--skip-tests for the second call; the build is reused while
# the machine stays warm).
# Needs .deps/ carried (toml++ and pcre2 headers, shared data). Usage:
#   bash bench/gpu_train.sh [--torch] [--skip-tests] [--no-shakespeare]
source "$(dirname "$0")/gpu_common.sh"
torch=0 tests=1 shakespeare=1
for a in "$@"; do
  [[ $a == --torch ]] && torch=1
  [[ $a == --skip-tests ]] && tests=0
  [[ $a == --no-shakespeare ]] && shakespeare=0
done
gpu_build ${TARGETS:-peerless test_ops_cuda test_ops_train_cuda test_fused_cuda test_model_cuda test_peer_cuda test_proj_cuda}
if [[ $tests == 1 ]]; then
  # Every gpu-labelled test, the GPU-vs-CPU loss curves included (~5 min on the H100 with -j 2).
  (cd build-gpu && ctest -L gpu -j 2 --timeout 400 --output-on-failure > "$OUT/ctest_gpu.log" 2>&1)
  grep -E "tests passed|Failed|\*\*\*" "$OUT/ctest_gpu.log" | head
fi
echo "== bench train (370M)"
timeout 300 $b bench train --config configs/mmf-370m.toml --batch 4,8,16 --seq 2048 --steps 5 --warmup 2 2>&1 | tee "$OUT/bench_train.txt"
echo "== bench train (Transformer++ 370M, the same shape)"
timeout 300 $b bench train --config configs/tpp-370m.toml --batch 8,16 --seq 2048 --steps 5 --warmup 2 \
  --deterministic off 2>&1 | tee "$OUT/bench_train_tpp.txt"
echo "== bench ops"
timeout 100 $b bench ops --tokens 32768 2>&1 | tee "$OUT/bench_ops.txt" | tail -24
echo "== bench peer-layer"
timeout 200 $b bench peer-layer 2>&1 | tee "$OUT/bench_peer_layer.txt" | tail -30
echo "== bench peer-layer --ternary (model.peer_ternary: 2-bit packed expert tables)"
timeout 200 $b bench peer-layer --ternary 2>&1 | tee "$OUT/bench_peer_layer_ternary.txt" | tail -30
echo "== bench peer-layer --ternary-int8 (the earlier int8 copy, for comparison)"
timeout 200 $b bench peer-layer --ternary-int8 --tokens 8192 2>&1 | tee "$OUT/bench_peer_layer_ternary_int8.txt" | tail -16
if [[ $shakespeare == 1 ]]; then
echo "== train on Tiny Shakespeare, one GPU"
$b prepare --input ../shared/data/tinyshakespeare/input.txt --out /tmp/ts.h5 --quiet > /dev/null
timeout 240 $b train configs/shakespeare-byte.toml --set data.path=/tmp/ts.h5 --set run.out_dir=/tmp/runs --set run.name=gpu \
  --set run.device=cuda --set train.log_every=50 --overwrite > "$OUT/train_gpu.log" 2>&1; echo "rc=$?"
grep -E "step .*(50|100|200|300|400|500)/|validation|trained|GPU memory|device:" "$OUT/train_gpu.log" | tail -16
cp /tmp/runs/gpu/metrics.jsonl "$OUT/train_gpu_metrics.jsonl" 2>/dev/null
echo "== train the PEER variant on Tiny Shakespeare, one GPU"
timeout 300 $b train configs/shakespeare-peer.toml --set data.path=/tmp/ts.h5 --set run.out_dir=/tmp/runs --set run.name=gpu-peer \
  --set run.device=cuda --set train.log_every=100 --overwrite > "$OUT/train_gpu_peer.log" 2>&1; echo "rc=$?"
grep -E "step .*00/|validation|trained|GPU memory|device:" "$OUT/train_gpu_peer.log" | tail -30
cp /tmp/runs/gpu-peer/metrics.jsonl "$OUT/train_gpu_peer_metrics.jsonl" 2>/dev/null
fi
if [[ $torch == 1 && -f bench/torch_mmf.py ]]; then
  echo "== PyTorch baseline"
  PYTHONUNBUFFERED=1 timeout "${TORCH_TIMEOUT:-420}" python3 bench/torch_mmf.py --config configs/mmf-370m.toml \
    --batch 16,8,4 --modes eager,compile --steps 5 --warmup 2 2>&1 | tee "$OUT/torch.log" | tail -20
fi
