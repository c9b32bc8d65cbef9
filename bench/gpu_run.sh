#!/usr/bin/env bash
# One command for the GPU machine (the device tool): build natively for sm_90, run the CPU suite,
# the NCCL collective tests, a training run through the NCCL path against the MPI path, and
# `bench comm`; logs under $OUT. Needs .deps/ carried (toml++ and pcre2 headers, shared data),
# since that machine has no package manager.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
[[ -e ../shared ]] || ln -s "$root/.deps/shared" ../shared
export PEERLESS_SHARED="$root/../shared"
nvidia-smi -L | tee "$OUT/gpu.txt"
git rev-parse --short HEAD >> "$OUT/gpu.txt" 2>/dev/null
{ cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DPEERLESS_EXTRA_INCLUDE="$root/.deps/include" && cmake --build build-gpu -j 16; } > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
echo "build ok"
(cd build-gpu && ctest -j 8 -LE gpu --timeout 300 > "$OUT/ctest_cpu.log" 2>&1); tail -4 "$OUT/ctest_cpu.log"
grep -E "Failed|\*\*\*" "$OUT/ctest_cpu.log" | head
echo "== NCCL collectives, one rank"
PEERLESS_EXPECT_WORLD=1 PEERLESS_TEST_BACKEND=nccl build-gpu/bin/test_mpi_collectives > "$OUT/nccl_single.log" 2>&1; echo "rc=$?"; tail -3 "$OUT/nccl_single.log"
PEERLESS_EXPECT_WORLD=1 PEERLESS_TEST_BACKEND=nccl mpirun -np 1 build-gpu/bin/test_mpi_collectives > "$OUT/nccl_np1.log" 2>&1; echo "rc=$?"; tail -3 "$OUT/nccl_np1.log"
echo "== training: NCCL path vs MPI path (1 GPU)"
b=build-gpu/bin/peerless
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
