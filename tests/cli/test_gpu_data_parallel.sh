# Data parallel on GPUs (run.device = cuda; labelled gpu, it needs a GPU): the same global batch
# trained 20 steps on 1 rank with 2 accumulation steps and on 2 ranks with 1 gives the same losses
# and validation losses (relative difference < 3e-4; 3e-3 with a PEER block, where a flipped int8
# code can also flip an expert choice) and gradient norms (step 1, equal weights: < 1e-5). Why not
# equal: the ranks sum the gradient in another order, which once in a while flips an int8 activation
# code (test_dp_equivalence.sh); measured on the H100 without PEER: 8.6e-5 for the losses, 5.0e-5 for
# the validations (which the GPUs compute), 0 for the step-1 gradient norm. Data-parallel bugs (a wrong scale, a missing reduction)
# show up in the gradient norm from step 1. The 2-rank runs use the MPI backend, so both ranks may
# share one GPU (NCCL refuses that; with one GPU per rank the NCCL path reduces the device gradient
# directly). Settings the GPU model does not support are config errors naming their key.
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
common=(--set data.path=ts.h5 --set run.out_dir=runs --set run.device=cuda --set train.sample_tokens=0
        --set train.micro_batch=4 --set train.log_every=1 --set train.eval_every=10 --set train.eval_windows=8
        --set train.final_eval_windows=16 --set model.d_model=64 --set model.intermediate=128)
"$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=g1 --set train.accum_steps=2 > g1.log
mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set parallel.backend=mpi --set run.name=g2 \
    --set train.accum_steps=1 > g2.log
# With a PEER block (whole tables on every rank): its BatchNorm statistics are summed with the gradient
# and averaged over accumulation steps x ranks.
peer=(--set model.peer_blocks=0 --set model.peer_n_sub=16 --set model.peer_heads=2 --set model.peer_topk=4
      --set model.peer_key_dim=16)
"$bin" train "$src/configs/tiny.toml" "${common[@]}" "${peer[@]}" --set run.name=p1 --set train.accum_steps=2 > p1.log
mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" "${peer[@]}" --set parallel.backend=mpi \
    --set parallel.expert_parallel=1 --set run.name=p2 --set train.accum_steps=1 > p2.log
grep -q "data parallel: 2 ranks, backend mpi" g2.log || { cat g2.log; fail "2-rank run did not report its setup"; }
/usr/bin/python3 - <<'PY'
import json
def rows(name):
    return [json.loads(l) for l in open(f"runs/{name}/metrics.jsonl")]
def rel(x, y):
    return abs(x - y) / abs(x)
for one, two, bound in [("g1", "g2", 3e-4), ("p1", "p2", 3e-3)]:
    base, other = rows(one), rows(two)
    assert len(base) == 21 and len(other) == 21, (two, len(base), len(other))
    worst = max(rel(a["loss"], b["loss"]) for a, b in zip(base, other))
    # The gradient norm (before clipping): a wrong gradient scale (averaged instead of summed, or
    # reduced twice) hides in the losses under AdamW and clipping, not here. Step 1 sees equal weights.
    g_first = rel(base[0]["grad_norm"], other[0]["grad_norm"])
    g_worst = max(rel(a["grad_norm"], b["grad_norm"]) for a, b in zip(base[:-1], other[:-1]))
    # Validation on the GPU: the in-loop evaluation at step 10 and the final one (the last line).
    vals = [(a["val_loss"], b["val_loss"]) for a, b in zip(base, other) if "val_loss" in a]
    assert len(vals) == 2, (two, vals)
    worst_val = max(rel(x, y) for x, y in vals)
    print(f"{two}: max relative difference to 1 rank x 2 accumulation: losses {worst:.2e}, gradient norm "
          f"{g_worst:.2e} (step 1: {g_first:.2e}), validation {worst_val:.2e}")
    assert worst < bound and worst_val < bound, (two, worst, worst_val)
    # Later gradient norms follow the trajectories apart faster than the losses (3.2e-3 measured
    # without PEER): a loose bound there; the tight check is step 1.
    assert g_first < 1e-5 and g_worst < 5e-2, (two, g_first, g_worst)
    assert base[-1]["loss"] < base[0]["loss"] - 0.3, f"{one} did not learn"
PY
expect_error "GPU data parallel with ZeRO-1" "parallel.zero1" \
  mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set parallel.backend=mpi --set run.name=gz \
  --set parallel.zero1=true
expect_error "GPU data parallel with sharded PEER tables" "parallel.expert_parallel = 1" \
  mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set parallel.backend=mpi --set run.name=ge \
  --set model.peer_blocks=0 --set model.peer_n_sub=16 --set model.peer_heads=2 --set model.peer_topk=4 \
  --set model.peer_key_dim=16
echo "ok: GPU data parallel on 2 ranks matches 1 rank with accumulation"
