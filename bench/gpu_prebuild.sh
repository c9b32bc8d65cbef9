#!/usr/bin/env bash
# Builds the GPU machine's binaries HERE (sm_90, host code at x86-64-v3, shared peerless_* libraries)
# and packs them for the device tool's carry, so that a device call spends its minutes running, not
# compiling (a build there is ~5 min of a 30 min budget). Output .gpucarry/ (git-ignored; the tool
# carries at most 64 MiB):
#   build.tar   build-sm90's binaries, shared libraries and CTest files (ctest runs there as here:
#               the device copy sits at the same path, recorded in root.txt)
#   lib/        this machine's copies of the system libraries they load (linked in there only
#               where the image lacks them)
#   include/    toml++ and pcre2.h (bench/gpu_prebuilt.sh's fallback build)
#   shared/     the two small corpora the GPU tests read
# Usage: bash bench/gpu_prebuild.sh [TARGET...]   (default: bench/gpu_targets.sh's list)
# then: run(command="bash bench/gpu_prebuilt.sh 'CMD'", carry=[".gpucarry"]); see that script.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source bench/gpu_targets.sh
(($# > 0)) && gpu_targets=("$@")
cmake -S . -B build-sm90 -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DPEERLESS_MARCH=x86-64-v3 \
  -DPEERLESS_SHARED_LIBS=ON -DPEERLESS_ASAN_FUZZ=OFF >/dev/null
cmake --build build-sm90 -j "$(nproc)" --target "${gpu_targets[@]}"
c=.gpucarry
rm -rf $c && mkdir -p $c/lib $c/include $c/shared/data
echo "$root" > $c/root.txt
files=$(cd build-sm90 && find . -name '*.so' -o -name 'CTestTestfile.cmake' -o -name '*_include.cmake' \
  -o -name '*_tests.cmake' | sort; for t in "${gpu_targets[@]}"; do echo "./bin/$t"; done)
strip --strip-unneeded $(cd build-sm90 && for f in $files; do [[ $f == *.so || $f == ./bin/* ]] && echo "build-sm90/$f"; done)
tar -cf $c/build.tar $(for f in $files; do echo "build-sm90/$f"; done)
# Every system library the binaries load, except the C runtime and Open MPI's (the image's mpirun
# must load its own).
for l in $(ldd build-sm90/bin/* build-sm90/*.so | awk '$3 ~ /^\/lib\/x86_64-linux-gnu\// {print $3}' | sort -u); do
  case "$(basename "$l")" in
    libc.so* | libm.so* | libstdc++* | libgcc_s* | libpthread* | librt* | libdl* | libresolv* | libmpi* | libopen-rte* | \
      libopen-pal* | libhwloc* | libevent* | libudev* | libgomp* | libz.so* | libgfortran* | libquadmath*) ;;
    *) cp -L "$l" $c/lib/ ;;
  esac
done
cp -r /usr/include/toml++ /usr/include/pcre2.h $c/include/
shared="${PEERLESS_SHARED:-$root/../shared}/data"
cp -r "$shared/tinyshakespeare" "$shared/tinyllamas-stories260k" $c/shared/data/
du -sh $c $c/*
