#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds everything, runs CTest (GPU tests are
# labelled `gpu` and excluded here; run them on a GPU machine with `ctest -L gpu`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch/setup.sh"
cd "$peerless_root"

peerless_install_packages
peerless_build
cd build
ctest --output-on-failure -j "$(nproc)" -LE gpu "$@"
