#!/usr/bin/env bash
# The newcomer's first command: installs what is missing, builds, prepares the default data
# (Tiny Shakespeare from ../shared/data, or $PEERLESS_DATA_DIR, or a built-in synthetic language),
# trains a small ternary MatMul-free LM on the CPU (about 8 minutes on 2 cores) and prints where the
# run, its metrics and its samples are.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$peerless_root"

peerless_install_packages
peerless_build peerless

data=runs/data/default-byte.h5
if [[ ! -f "$data" ]]; then
  mkdir -p runs/data
  build/bin/peerless prepare --default --tokenizer byte --out "$data"
fi
build/bin/peerless train configs/shakespeare-byte.toml --overwrite "$@" | tee runs/demo-train.log
run=runs/shakespeare-byte
echo
echo "run:      $run"
echo "metrics:  $run/metrics.jsonl"
echo "samples:  $run/samples.txt  (more: build/bin/peerless sample $run --prompt 'ROMEO:')"
echo "--- sample ---"
head -c 600 "$run/samples.txt"
echo
echo "--- result ---"
grep -E "^(trained|validation loss)" runs/demo-train.log
