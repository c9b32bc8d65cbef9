#!/usr/bin/env bash
# The device side of bench/gpu_prebuild.sh: unpacks .gpucarry/build.tar into build-sm90/ and runs CMD
# with $B = build-sm90/bin (e.g. 'cd build-sm90 && ctest -L gpu'). System libraries the image lacks
# are linked in from .gpucarry/lib (only those: the rest stay the image's). If one is still missing,
# the binaries do not start, or this copy sits elsewhere than where they were built, it builds here
# (bench/gpu_common.sh) and $B is build-gpu/bin. $OUT, ../shared and Open MPI as root as there.
# Usage (device tool, carry [".gpucarry"]): bash bench/gpu_prebuilt.sh 'CMD'
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
C=$root/.gpucarry
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT" $C/need
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1 LD_LIBRARY_PATH=$C/need
[[ -e ../shared ]] || ln -s $C/shared ../shared
export PEERLESS_SHARED=$root/../shared
nvidia-smi -L | tee "$OUT/gpu.txt"
tar -xf $C/build.tar
export B=$root/build-sm90/bin
for _ in 1 2 3 4; do  # a library found may need another one
  for l in $(ldd $B/* build-sm90/*.so | awk '/not found/ {print $1}' | sort -u); do ln -sf $C/lib/$l $C/need/$l; done
done
echo "libraries from .gpucarry/lib: $(ls $C/need | tr '\n' ' ')"
if [[ "$(cat $C/root.txt)" != "$root" ]] || ldd $B/* | grep -q "not found" || ! $B/peerless --help > /dev/null 2>&1; then
  echo "the carried build does not run here (built at $(cat $C/root.txt), here $root): building"
  ldd $B/* | grep "not found" | sort -u
  mkdir -p .deps && ln -sfn $C/include .deps/include
  export LD_LIBRARY_PATH=
  (source bench/gpu_common.sh && source bench/gpu_targets.sh && gpu_build "${gpu_targets[@]}") || exit 1
  rm -rf build-sm90 && ln -s build-gpu build-sm90  # CMD may name build-sm90
  export B=$root/build-gpu/bin
fi
eval "$1"
