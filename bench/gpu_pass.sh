#!/usr/bin/env bash
# The GPU pass over a tree whose GPU code has not run yet, and issue 20's figures beside the anchors,
# in parts that each fit one device call (10 min). Run through bench/gpu_prebuilt.sh after
# bench/gpu_prebuild.sh here, e.g.
#   run(command="bash bench/gpu_prebuilt.sh 'bash bench/gpu_pass.sh tests kernels'", carry=[".gpucarry"])
#   run(command="bash bench/gpu_prebuilt.sh 'bash bench/gpu_pass.sh train'", carry=[".gpucarry", ".anchors"])
# Parts (logs under $OUT, a summary on stdout):
#   tests    ctest -L gpu (every CPU-vs-CUDA test, the model curves, 2 and 4 ranks on one GPU)   ~2 min
#   kernels  bench_gemm_cuda --fused-only, bench attention, bench peer-layer (fp32, int8 and packed
#            ternary tables; --gemm tf32x3 | tf32 | bf16), bench ops                               ~3 min
#   train    the reference 370M and PEER-pytorch (bench/anchors.py, needs .anchors carried), then
#            bench train 370M at batch 8 and 16 for run.forward_gemm x run.recompute              ~6 min
#   large    the reference and bench train at 1.3B (batch 8) and 2.7B (batch 4), the default
#            GEMMs and activation plan (needs .anchors)                                           ~5 min
#   learn    Tiny Shakespeare PEER model, 600 steps: fp32 tables on tf32x3 GEMMs (the default)
#            against ternary tables on tf32x3 and on tf32                                          ~2 min
#   verify   ctest -L gpu over what changed since the last full pass (-R "$VERIFY", default the
#            expert-sharding, PEER, attention and recompute tests)                                                     ~1.5 min
#   baselines  bench attention, then Transformer++ and MatMul-free 370M, batch 8 and 16 (issue 15) ~2 min
#   wgmma    test_gemm_fused_cuda (the wgmma kernel bit for bit; a hang is killed), then if it passed
#            bench_gemm_cuda --fused-only and bench train 370M with run.forward_gemm = wgmma     ~3 min
#   peer     PEER-pytorch, then bench peer-layer with ternary tables (packed, int8) on tf32 GEMMs  ~1.5 min
# Needs $B (gpu_prebuilt.sh sets it: build-sm90/bin).
set -uo pipefail
OUT="${OUT:-/tmp/out}"
B="${B:?run through bench/gpu_prebuilt.sh}"
mkdir -p "$OUT"
cfg=configs/mmf-370m.toml

tests() {
  (cd build-sm90 && timeout 420 ctest -L gpu -j 4 --timeout 300 --output-on-failure > "$OUT/ctest_gpu.log" 2>&1)
  grep -E "tests passed|Failed|\*\*\*|Total Test" "$OUT/ctest_gpu.log" | head -40
}

kernels() {
  timeout 120 $B/bench_gemm_cuda --fused-only --reps 20 > "$OUT/gemm_fused.txt" 2>&1
  tail -25 "$OUT/gemm_fused.txt"
  timeout 90 $B/peerless bench attention > "$OUT/attention.txt" 2>&1
  tail -8 "$OUT/attention.txt"
  timeout 60 $B/peerless bench ops --tokens 16384 > "$OUT/ops.txt" 2>&1
  tail -20 "$OUT/ops.txt"
  timeout 60 $B/peerless bench peer-layer --tokens 8192 --table-grad sparse > "$OUT/peer_fp32.txt" 2>&1
  grep -E "^##|tokens/s" "$OUT/peer_fp32.txt"
  timeout 60 $B/peerless bench peer-layer --ternary-int8 --tokens 8192 --table-grad sparse > "$OUT/peer_t_int8.txt" 2>&1
  echo "int8 ternary rows (before the packed codes):"; grep -E "tokens/s|experts" "$OUT/peer_t_int8.txt"
  for g in tf32x3 tf32 bf16; do
    timeout 60 $B/peerless bench peer-layer --ternary --tokens 8192 --table-grad sparse --gemm $g > "$OUT/peer_t_$g.txt" 2>&1
    echo "ternary, --gemm $g:"; grep -E "tokens/s|experts|retrieval|projection|rest of" "$OUT/peer_t_$g.txt"
  done
}

bench_train() {  # NAME CONFIG BATCHES then --set KEY=VALUE ...
  local name=$1 config=$2 batches=$3
  shift 3
  timeout 200 $B/peerless bench train --config "$config" --batch "$batches" --seq 2048 --deterministic off "$@" \
    > "$OUT/train_$name.txt" 2>&1
  echo "== $name: $*"
  grep -E "^ +[0-9]+ +2048|GEMM forward|out of memory|error" "$OUT/train_$name.txt"
}

train() {
  export PYTHONUNBUFFERED=1
  timeout 240 python3 bench/anchors.py mmfreelm --config $cfg --batch 8,16 --seq 2048 2>&1 | tee "$OUT/anchor_mmfreelm.txt" \
    | grep -v '^{' | grep -v transformers | tail -4
  timeout 100 python3 bench/anchors.py peer --batch 4 --seq 2048 2>&1 | tee "$OUT/anchor_peer.txt" | grep -v '^{' | tail -3
  for g in cublaslt fused; do
    for r in none mlgru all; do
      [[ $g == cublaslt && $r != none ]] && continue
      bench_train "370m_${g}_$r" $cfg 8,16 --forward-gemm $g --set run.recompute=$r
    done
  done
}

large() {
  export PYTHONUNBUFFERED=1
  for cb in "mmf-1.3b 8" "mmf-2.7b 4"; do  # the reference where it fits (issue 20 item 3)
    set -- $cb
    timeout 150 python3 bench/anchors.py mmfreelm --config configs/$1.toml --batch $2 --seq 2048 2>&1 \
      | tee "$OUT/anchor_$1.txt" | grep -v '^{' | grep -v transformers | tail -3
  done
  bench_train 1.3b configs/mmf-1.3b.toml 8
  bench_train 2.7b configs/mmf-2.7b.toml 4
}

learn() {  # fp32 tables on tf32x3 GEMMs (the verified default) against ternary tables on tf32x3 and tf32
  local data=runs/data/default-byte.h5
  [[ -f $data ]] || $B/peerless prepare --default --tokenizer byte --out $data > "$OUT/prepare.txt" 2>&1
  for tg in "false tf32x3" "true tf32x3" "true tf32"; do
    set -- $tg
    local name=peer_t$1_$2
    timeout 100 $B/peerless train configs/shakespeare-peer.toml --overwrite --set run.device=cuda \
      --set run.name=$name --set model.peer_ternary=$1 --set model.peer_gemm=$2 --set train.max_steps=600 \
      --set train.eval_every=200 > "$OUT/learn_$name.txt" 2>&1
    echo "== model.peer_ternary = $1, model.peer_gemm = $2"; grep -E "val_loss|val loss|tokens/s" "$OUT/learn_$name.txt" | tail -4
    cp runs/$name/metrics.jsonl "$OUT/learn_$name.metrics.jsonl" 2>/dev/null
  done
}

verify() {
  local re="${VERIFY:-peer|pkm|moe|expert|shard|attention|Recompute|tpp|bitnet}"
  (cd build-sm90 && timeout 300 ctest -L gpu -R "$re" -j 4 --timeout 240 --output-on-failure > "$OUT/ctest_verify.log" 2>&1)
  grep -E "tests passed|Failed|\*\*\*|Total Test" "$OUT/ctest_verify.log" | head -20
}

baselines() {
  timeout 90 $B/peerless bench attention > "$OUT/attention.txt" 2>&1
  tail -8 "$OUT/attention.txt"
  for c in tpp-370m mmf-370m; do bench_train "$c" configs/$c.toml 8,16; done
}

wgmma() {
  timeout 150 $B/test_gemm_fused_cuda > "$OUT/test_gemm_fused.txt" 2>&1
  local rc=$?
  grep -E "^\[  (PASSED|FAILED|  OK|SKIPPED) |Failure|tests ran" "$OUT/test_gemm_fused.txt" | head -30
  ((rc == 0)) || { echo "test_gemm_fused_cuda exit $rc: no wgmma timings"; return; }
  timeout 90 $B/bench_gemm_cuda --fused-only --reps 20 > "$OUT/gemm_wgmma.txt" 2>&1
  tail -16 "$OUT/gemm_wgmma.txt"
  bench_train 370m_wgmma configs/mmf-370m.toml 8,16 --forward-gemm wgmma
}

peer() {
  timeout 100 python3 bench/anchors.py peer --batch 4 --seq 2048 2>&1 | tee "$OUT/anchor_peer.txt" | grep -v '^{' | tail -3
  for t in ternary ternary-int8; do
    timeout 60 $B/peerless bench peer-layer --$t --tokens 8192 --table-grad sparse --gemm tf32 > "$OUT/peer_${t}_tf32.txt" 2>&1
    echo "--$t --gemm tf32:"; grep -E "tokens/s|experts (for|back)" "$OUT/peer_${t}_tf32.txt"
  done
}

(($# > 0)) || { sed -n 2,22p "$0"; exit 1; }
for part in "$@"; do
  case $part in
    tests | kernels | train | large | learn | verify | baselines | wgmma | peer) echo "#### $part"; $part ;;
    *) echo "unknown part '$part' (tests, kernels, train, large, learn, verify, baselines, wgmma, peer)"; exit 1 ;;
  esac
done
