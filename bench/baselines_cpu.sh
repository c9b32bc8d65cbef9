#!/usr/bin/env bash
# The baselines beside the MatMul-free LM on Tiny Shakespeare bytes, on the CPU, in one run: the same
# data, width (d 256), depth (4 blocks), tokens (batch 16 x T 256 per step), optimizer and schedule
# for every architecture (configs/shakespeare-*.toml), so that validation loss at equal training
# FLOPs compares the architectures and nothing else. Prints a Markdown table (parameters, active
# parameters, forward FLOPs per token, final validation loss, tokens/s) and writes the curves as a
# PNG (gnuplot; Debian: apt-get install gnuplot-nox).
#
# Usage: bash bench/baselines_cpu.sh [STEPS (default 200)] [OUT (default runs/baselines)] [MODELS...]
# PEERLESS_BIN: the binary (default build/bin/peerless); PEERLESS_DEVICE=cuda runs every model on the GPU
# (the GPU machine: bash bench/baselines_cpu.sh 150 OUT with PEERLESS_BIN=build-gpu/bin/peerless). PEER runs with N = 64² experts here (the
# config's 256² is a GPU size; on 2 cores it would take as long as all the others together).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${PEERLESS_BIN:-$root/build/bin/peerless}"
steps="${1:-200}"
out="${2:-runs/baselines}"
shift $(( $# > 2 ? 2 : $# ))
models=("$@")
[[ ${#models[@]} -gt 0 ]] || models=(byte tpp bitnet moe sigma-moe pkm peer)
declare -A extra=([peer]="--set model.peer_n_sub=64")
data=runs/data/default-byte.h5
mkdir -p "$out"
[[ -f "$data" ]] || "$bin" prepare --default --tokenizer byte --out "$data"
every=$(( steps / 4 > 0 ? steps / 4 : 1 ))

failed=""  # models whose run failed (the others still run; the script exits 1 at the end)
table="$out/table.md"
echo "| model | parameters | active / token | forward FLOP / token | final val loss (nats/byte) | tokens/s |" > "$table"
echo "|---|---|---|---|---|---|" >> "$table"
for m in "${models[@]}"; do
  cfg="$root/configs/shakespeare-$m.toml"
  args=(--set "run.out_dir=$out" --set "run.name=$m" --set "train.max_steps=$steps" --set "train.eval_every=$every"
        --set train.time_limit_minutes=0 --set train.sample_tokens=0 --set train.eval_windows=32
        --set train.final_eval_windows=128 --set "run.device=${PEERLESS_DEVICE:-cpu}" ${extra[$m]:-})
  acct="$("$bin" train "$cfg" --dry-run "${args[@]}" | grep '^accounting:')"
  echo "== $m: $acct"
  "$bin" train "$cfg" --overwrite "${args[@]}" > "$out/$m.log" 2>&1 || { tail -5 "$out/$m.log"; failed+=" $m"; continue; }
  # metrics.jsonl -> "tokens val_loss" rows for the plot; the final val loss and the mean tokens/s.
  python3 - "$out/$m/metrics.jsonl" "$out/$m.dat" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "val_loss" in l]
# The last row is the final evaluation on train.final_eval_windows (another sample size than the
# in-training evals): the table reports it, the curve keeps one sample size.
with open(sys.argv[2], "w") as f:
    for r in rows[:-1]:
        f.write(f"{r['tokens']} {r['val_loss']}\n")
EOF
  final="$(python3 -c "import json,sys; r=[json.loads(l) for l in open('$out/$m/metrics.jsonl') if 'val_loss' in l]; print('%.4f' % r[-1]['val_loss'])")"
  tps="$(python3 -c "import json; r=[json.loads(l) for l in open('$out/$m/metrics.jsonl')]; t=[x['tokens_per_s'] for x in r[1:]] or [r[0]['tokens_per_s']]; print('%.0f' % (sum(t)/len(t)))")"
  params="$(sed -E 's/.*parameters ([0-9,]+),.*/\1/' <<< "$acct")"
  active="$(sed -E 's/.*active per token ([0-9,]+);.*/\1/' <<< "$acct")"
  fwd="$(sed -E 's/.*forward ([0-9.]+ [kMG]?FLOP) per token.*/\1/' <<< "$acct")"
  echo "| $m | $params | $active | $fwd | $final | $tps |" >> "$table"
  echo "   final val loss $final, $tps tokens/s"
done
cat "$table"

# Validation loss against tokens seen (every model sees the same tokens; the table gives FLOP/token).
if command -v gnuplot > /dev/null; then
  plot=""
  for m in "${models[@]}"; do plot+="'$out/$m.dat' using 1:2 with linespoints title '$m', "; done
  gnuplot <<EOF
set terminal pngcairo size 900,560 noenhanced
set output '$out/val_loss.png'
set title 'Tiny Shakespeare bytes, d 256, 4 blocks, batch 16 x 256: validation loss (in-training evals)'
set xlabel 'training tokens'
set ylabel 'validation loss (nats/byte)'
set grid
set key top right
plot ${plot%, }
EOF
  echo "plot: $out/val_loss.png"
else
  echo "no gnuplot: curves left as $out/*.dat (apt-get install gnuplot-nox for the PNG)"
fi
[[ -z $failed ]] || { echo "FAILED:$failed"; exit 1; }
