# Sourced by the GPU machine's scripts (bench/gpu_*.sh, run through the device tool with .deps/
# carried: toml++ and pcre2 headers, shared data, made by bench/gpu_deps.sh; that machine has no
# package manager): the repository root as the working directory, $OUT for logs, Open MPI allowed
# as root, ../shared from .deps/, the GPU's name in $OUT/gpu.txt, and
#   gpu_build [TARGET...]   configure build-gpu for sm_90 and build the targets (all without any);
#                           log in $OUT/build.log; exits with its tail on failure
# and $b, the peerless binary it builds.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
[[ -e ../shared ]] || ln -s "$root/.deps/shared" ../shared
export PEERLESS_SHARED="$root/../shared"
nvidia-smi -L | tee "$OUT/gpu.txt"
# The commit: give PEERLESS_COMMIT=$(git rev-parse --short HEAD) on the command line, since the
# device machine's copy carries the working tree but not always the current git metadata.
echo "commit ${PEERLESS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null) (git of the device copy, may lag)}" >> "$OUT/gpu.txt"
b=build-gpu/bin/peerless

gpu_build() {
  local targets=()
  (($# > 0)) && targets=(--target "$@")
  { cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DPEERLESS_EXTRA_INCLUDE="$root/.deps/include" && cmake --build build-gpu -j 16 "${targets[@]}"; } \
    > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  echo "build ok"
}
