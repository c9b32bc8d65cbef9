# `peerless train <reference config> --dry-run` prints exactly the parameter counts of SPEC §2.
source "$(dirname "$0")/common.sh"
for pair in "mmf-370m 374108160" "mmf-1.3b 1364779008" "mmf-2.7b 2702357504"; do
  set -- $pair
  out="$("$bin" train "$src/configs/$1.toml" --dry-run)"
  echo "$out" | grep -qx "parameters: $2" || { echo "$out"; fail "$1: expected 'parameters: $2'"; }
  echo "$out" | grep -q "ternary: " || fail "$1: no ternary count"
  echo "$out" | grep -q "memory per rank" || fail "$1: no memory estimate"
  echo "ok: $1 parameters: $2"
done
