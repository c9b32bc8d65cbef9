#!/usr/bin/env bash
# The device side of bench/gpu_prebuild.sh: runs CMD with $B the carried binaries (.gpucarry/bin).
# Libraries the image lacks are taken from .gpucarry/lib (only those: the rest stay the image's);
# if one is still missing, or the binaries do not start, it builds there (bench/gpu_common.sh) and
# points $B at build-gpu/bin instead. $OUT, ../shared and Open MPI as root as in gpu_common.sh.
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
for _ in 1 2 3 4; do  # a library found may need another one
  for l in $(ldd $C/bin/* | awk '/not found/ {print $1}' | sort -u); do ln -sf $C/lib/$l $C/need/$l; done
done
echo "libraries from .gpucarry/lib: $(ls $C/need | tr '\n' ' ')"
export B=$C/bin
if ldd $B/* | grep -q "not found" || ! $B/peerless --help > /dev/null 2>&1; then
  ldd $B/* | grep "not found"
  echo "the carried binaries do not run here: building"
  mkdir -p .deps && ln -sfn $C/include .deps/include
  export LD_LIBRARY_PATH=
  (source bench/gpu_common.sh && gpu_build $(ls $C/bin)) || exit 1
  export B=$root/build-gpu/bin
fi
eval "$1"
