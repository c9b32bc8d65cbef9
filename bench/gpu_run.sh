#!/usr/bin/env bash
# One command for the GPU machine (the device tool): build natively for sm_90, run the CPU suite,
# the NCCL collective tests, a training run through the NCCL path against the MPI path, and
# `bench comm`; logs under $OUT. Needs .deps/ carried (toml++ and pcre2 headers, shared data),
# since that machine has no package manager.
source "$(dirname "$0")/gpu_common.sh"
gpu_build
(cd build-gpu && ctest -j 8 -LE gpu --timeout 300 > "$OUT/ctest_cpu.log" 2>&1); tail -4 "$OUT/ctest_cpu.log"
grep -E "Failed|\*\*\*" "$OUT/ctest_cpu.log" | head
echo "== NCCL collectives, one rank"
PEERLESS_EXPECT_WORLD=1 PEERLESS_TEST_BACKEND=nccl build-gpu/bin/test_mpi_collectives > "$OUT/nccl_single.log" 2>&1; echo "rc=$?"; tail -3 "$OUT/nccl_single.log"
PEERLESS_EXPECT_WORLD=1 PEERLESS_TEST_BACKEND=nccl mpirun -np 1 build-gpu/bin/test_mpi_collectives > "$OUT/nccl_np1.log" 2>&1; echo "rc=$?"; tail -3 "$OUT/nccl_np1.log"
echo "== training: NCCL path vs MPI path (1 GPU)"
$b prepare --input ../shared/data/tinyshakespeare/input.txt --out /tmp/ts.h5 --quiet > /dev/null
for be in mpi nccl; do
  mpirun -np 1 $b train configs/tiny.toml --set data.path=/tmp/ts.h5 --set run.out_dir=/tmp/runs --set run.name=$be \
    --set parallel.backend=$be --set train.log_every=1 --set train.max_steps=50 --set train.sample_tokens=0 \
    --overwrite > "$OUT/train_$be.log" 2>&1; echo "$be rc=$?"
done
python3 - <<'PY'
import json
a = [json.loads(l)["loss"] for l in open("/tmp/runs/mpi/metrics.jsonl")]
b = [json.loads(l)["loss"] for l in open("/tmp/runs/nccl/metrics.jsonl")]
print("steps", len(a), len(b), "max relative difference NCCL vs MPI:", max(abs(x - y) / abs(x) for x, y in zip(a, b)))
PY
echo "== bench comm"
$b bench comm --backend nccl --min-bytes 1K --max-bytes 1G > "$OUT/bench_comm_nccl1.txt" 2>&1; echo "rc=$?"
mpirun -np 1 $b bench comm --backend mpi --min-bytes 1K --max-bytes 64M > "$OUT/bench_comm_mpi1.txt" 2>&1
grep -E "average|^#" "$OUT/bench_comm_nccl1.txt" | head -20
tail -5 "$OUT/bench_comm_nccl1.txt"
