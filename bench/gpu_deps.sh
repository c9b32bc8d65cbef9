#!/usr/bin/env bash
# Makes .deps/ (git-ignored), what bench/gpu_*.sh need carried to the GPU machine when it builds
# there: the toml++ and pcre2 headers its image lacks (.deps/include, from this machine's Debian
# packages: launch/setup.sh installs them) and the shared data (.deps/shared, ~26 MiB; the carry
# limit is 64 MiB in all). Usage: bash bench/gpu_deps.sh   then carry [".deps"].
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
shared="${PEERLESS_SHARED:-$root/../shared}"
[[ -d "$shared/data" ]] || { echo "no shared data at $shared (set PEERLESS_SHARED)" >&2; exit 1; }
rm -rf "$root/.deps" && mkdir -p "$root/.deps/include" "$root/.deps/shared"
cp -r /usr/include/toml++ /usr/include/pcre2.h "$root/.deps/include/"
cp -rL "$shared/data" "$root/.deps/shared/"
du -sh "$root/.deps"
