# Shared by launch/demo.sh and tests/run.sh (sourced, not run): installs the Debian packages listed
# in launch/packages.txt that are missing, then configures and builds into build/. Both steps are
# no-ops when nothing changed, so a second run is fast.

peerless_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

peerless_install_packages() {
  local missing=()
  while read -r pkg; do
    [[ -z "$pkg" || "$pkg" == \#* ]] && continue
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done < "$peerless_root/launch/packages.txt"
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -eq 0 ]]; then
    echo "installing missing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing Debian packages; install them with:" >&2
    echo "  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
}

# peerless_build [targets...]: Release build in build/ (CUDA compiled when nvcc is found).
peerless_build() {
  local jobs
  jobs="$(nproc)"
  if [[ ! -f "$peerless_root/build/CMakeCache.txt" ]]; then
    cmake -S "$peerless_root" -B "$peerless_root/build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  fi
  if [[ $# -gt 0 ]]; then
    local t
    for t in "$@"; do cmake --build "$peerless_root/build" -j "$jobs" --target "$t"; done
  else
    cmake --build "$peerless_root/build" -j "$jobs"
  fi
}
