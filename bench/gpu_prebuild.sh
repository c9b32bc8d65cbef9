#!/usr/bin/env bash
# Builds CUDA binaries for the GPU machine HERE (sm_90, host code at x86-64-v3) and packs them for the
# device tool's carry, so that a device call spends its minutes running, not compiling (a full build
# there is ~5 min of a 30 min budget). Output: .gpucarry/ (git-ignore it locally, e.g. in
# .git/info/exclude; the tool carries at most 64 MiB):
#   bin/      the stripped binaries          lib/      this machine's copies of the libraries they load
#   include/  toml++ and pcre2.h headers     shared/   the two small corpora the GPU tests read
#   (for bench/gpu_prebuilt.sh's fallback build)
# Usage: bash bench/gpu_prebuild.sh [TARGET...]   (default: peerless)
# then: run(command="bash bench/gpu_prebuilt.sh 'CMD'", carry=[".gpucarry"]), CMD using $B/<binary>.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
targets=("${@:-peerless}")
cmake -S . -B build-sm90 -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DPEERLESS_MARCH=x86-64-v3 >/dev/null
cmake --build build-sm90 -j "$(nproc)" --target "${targets[@]}"
c=.gpucarry
rm -rf $c && mkdir -p $c/bin $c/lib $c/include $c/shared/data
for t in "${targets[@]}"; do cp build-sm90/bin/$t $c/bin/ && strip $c/bin/$t; done
# Every library from /lib except the C runtime and Open MPI's (the image's mpirun must load its own).
for l in $(ldd $c/bin/* | awk '$3 ~ /^\/lib\/x86_64-linux-gnu\// {print $3}' | sort -u); do
  case "$(basename "$l")" in
    libc.so* | libm.so* | libstdc++* | libgcc_s* | libpthread* | librt* | libdl* | libresolv* | libmpi* | libopen-rte* | \
      libopen-pal* | libhwloc* | libevent* | libudev* | libgomp* | libz.so* | libgfortran* | libquadmath*) ;;
    *) cp -L "$l" $c/lib/ ;;
  esac
done
cp -r /usr/include/toml++ /usr/include/pcre2.h $c/include/
shared="${PEERLESS_SHARED:-$root/../shared}/data"
cp -r "$shared/tinyshakespeare" "$shared/tinyllamas-stories260k" $c/shared/data/
du -sh $c
