# `peerless train --dry-run --world N [--expert-parallel E]` (launch/plan.h) against real runs on
# N = 1, 2, 4 ranks (MPI backend): rank 0's model memory (planned "total" vs VmHWM minus the VmRSS
# before the model's buffers) within 10% (the rest is MPI's and the allocator's own buffers, a few
# MiB at most against ~40-150 MiB planned), and the bytes it sends per step: gradients and ZeRO-1
# gathers within 2% (the plan counts every bucket exactly; only the loss and norm scalars are left
# out), the PEER expert exchange within 30% (the plan assumes uniform routing; a trained router's
# entries crowd onto fewer owners, which sends less, and the measured figure is one batch's routing).
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
common=(--set data.path=ts.h5 --set run.out_dir=runs --set run.threads=1 --set train.sample_tokens=0
        --set train.micro_batch=2 --set train.log_every=3 --set train.eval_every=0 --set train.final_eval_windows=2
        --set train.max_steps=3 --set model.d_model=64 --set model.intermediate=128 --set model.peer_blocks=0
        --set model.peer_n_sub=256 --set model.peer_heads=2 --set model.peer_topk=4 --set model.peer_key_dim=16
        --set parallel.deterministic=off)
cfg="$src/configs/tiny.toml"
# within NAME PLANNED MEASURED REL: |planned − measured| ≤ REL·measured.
within() {
  awk -v p="$2" -v m="$3" -v r="$4" 'BEGIN { d = p - m; if (d < 0) d = -d; exit !(d <= r * m) }' ||
    fail "$1: planned $2, measured $3 (more than $4 apart)"
  echo "ok: $1 planned $2 measured $3"
}
field() { sed -n "s/.*$1 [^=]*= \([0-9]*\).*/\1/p" | head -1; }  # "gradients 1.2 KiB = 1234" -> 1234
check() {  # check NAME RANKS [--set ...]
  local name="$1" np="$2"
  shift 2
  "$bin" train "$cfg" "${common[@]}" "$@" --dry-run --world "$np" > "$name.plan"
  mpi "$np" "$bin" train "$cfg" "${common[@]}" "$@" --set run.name="$name" > "$name.log" 2>&1 ||
    { cat "$name.log"; fail "$name: training failed"; }
  local planned base peak
  planned=$(grep "total ≈" "$name.plan" | sed 's/.*total ≈ \([0-9.]*\) MiB.*/\1/')
  base=$(sed -n 's/.*(VmRSS): .* = \([0-9]*\) bytes/\1/p' "$name.log")
  peak=$(sed -n 's/.*rank 0 [0-9.]* [KMG]iB = \([0-9]*\) bytes.*/\1/p' "$name.log")
  within "$name memory (MiB)" "$planned" "$(awk -v a="$peak" -v b="$base" 'BEGIN { print (a - b) / 1048576 }')" 0.10
  [[ "$np" == 1 ]] && return 0
  local sent
  sent=$(grep "sent per optimizer step (measured" "$name.log")
  within "$name gradients" "$(grep '^  gradients' "$name.plan" | field gradients)" \
    "$(echo "$sent" | sed 's/.*: gradients \([0-9]*\),.*/\1/')" 0.02
  within "$name gathers" "$(grep '^  gathers' "$name.plan" | field gathers)" \
    "$(echo "$sent" | sed 's/.*gathers \([0-9]*\),.*/\1/')" 0.02
  within "$name expert gradients" "$(grep '^  expert gradients' "$name.plan" | field gradients)" \
    "$(echo "$sent" | sed 's/.*expert gradients \([0-9]*\),.*/\1/')" 0.02
  within "$name expert exchange" "$(grep '^  expert exchange' "$name.plan" | field exchange)" \
    "$(echo "$sent" | sed 's/.*expert exchange \([0-9]*\),.*/\1/')" 0.30
}
check w1 1
check w2 2
check w4 4
check w4z 4 --set parallel.zero1=true --set parallel.expert_parallel=2
grep -q "plan for world 4 (2 data-parallel replicas x 2 expert shards)" w4z.plan || { cat w4z.plan; fail "w4z topology line"; }
expect_error "world needs dry-run" "world plans a run" "$bin" train "$cfg" "${common[@]}" --world 4
expect_error "indivisible experts" "parallel.expert_parallel" "$bin" train "$cfg" "${common[@]}" --dry-run --world 6 --expert-parallel 4
