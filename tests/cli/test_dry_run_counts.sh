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
# The BASELINES §5 accounting line: forward / training GFLOP per token of the HGRN-bit (MatMul-free)
# references, 0.682 / 2.05 (370M), 2.597 / 7.79 (1.3B), 5.239 / 15.72 (2.7B).
for pair in "mmf-370m 682.1_MFLOP 2.05_GFLOP" "mmf-1.3b 2.6_GFLOP 7.79_GFLOP" "mmf-2.7b 5.24_GFLOP 15.72_GFLOP"; do
  set -- $pair
  want="forward ${2/_/ } per token .*training ${3/_/ } "
  line="$("$bin" train "$src/configs/$1.toml" --dry-run | grep '^accounting:')"
  echo "$line" | grep -q "$want" || fail "$1: expected '$want' in: $line"
  echo "ok: $1 $line"
done
# Transformer++ 370M (BASELINES §1, §5): 373,867,520 parameters, 0.783 / 2.40 GFLOP per token at T 2048
# (attention 13%, its scores counted 3.5x in training); the BitNet b1.58 370M, tied: 341,191,680.
out="$("$bin" train "$src/configs/tpp-370m.toml" --dry-run)"
echo "$out" | grep -qx "parameters: 373867520" || fail "tpp-370m: expected 373867520 parameters"
echo "$out" | grep -q "forward 782.81 MFLOP per token .*training 2.4 GFLOP" || { echo "$out" | head -2; fail "tpp-370m FLOPs"; }
"$bin" train "$src/configs/bitnet-370m.toml" --dry-run | grep -qx "parameters: 341191680" || fail "bitnet-370m: expected 341191680"
echo "ok: tpp-370m and bitnet-370m match BASELINES"
# A GPU run's dry run prints the GPU model's own plan (built in counting mode; no GPU needed), not
# only the CPU layout.
out="$("$bin" train "$src/configs/mmf-370m.toml" --dry-run --set run.device=cuda)"
echo "$out" | grep -q "if trained on the CPU; the GPU's plan follows" || fail "cuda dry run: CPU line unlabelled"
echo "$out" | grep -q "^device memory per rank" || { echo "$out"; fail "cuda dry run: no device plan"; }
echo "ok: the cuda dry run prints the device plan"
