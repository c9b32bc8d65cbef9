# Masked instruction data keeps data parallelism exact (BASELINES.md §7: DP 2 with uneven lengths =
# DP 1): the synthetic tasks have examples of different lengths, so the micro-batches count
# different numbers of targets; the loss divides by the global batch's counted targets, which every
# rank computes from (seed, step), so 1 rank x 4 accumulation steps, 2 ranks x 2 and 4 ranks x 1
# (global batch 8) give == losses, gradient norms, validation losses
# and model tensors (parallel.deterministic, the CPU default; tests/cli/exact.sh).
source "$(dirname "$0")/common.sh"
source "$src/tests/cli/exact.sh"
"$bin" tasks 160 --seed 5 --out t.jsonl >/dev/null
"$bin" prepare --format chat --input t.jsonl --out t.h5 --quiet >/dev/null
common=(--set data.path=t.h5 --set data.seq_len=64 --set run.out_dir=runs --set run.threads=1
        --set train.sample_tokens=0 --set train.micro_batch=2 --set train.log_every=1 --set train.eval_every=4
        --set train.final_eval_windows=8 --set train.max_steps=8)
run_np c1 0 4
run_np c2 2 2
run_np c4 4 1
grep -q "packed into" c1.log || fail "no packing line"
same_runs --rows 9 c1 c2 c4
echo "ok: masked loss identical on 1, 2 and 4 ranks"
