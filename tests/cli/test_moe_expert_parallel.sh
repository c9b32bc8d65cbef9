# Expert parallelism of the mixture-of-experts kinds (model/modules/experts.h): the experts of every
# "moe" / "sigma_moe" block sharded whole over the expert-parallel ranks (E/P each) train bit for
# bit like one rank (parallel.deterministic, the CPU default; tests/cli/exact.sh compares metrics rows
# and the assembled model.h5 tensors with ==), 12 steps, global batch 8 (micro-batch 2):
#   - moe (E 4, k 2): mpirun -np 1 x 4 accumulation == 2 ranks x 2 with 2 shards == 2 ranks
#     replicated (expert_parallel 1) == 4 ranks x 1 with 4 shards == 4 ranks with 2 shards x 2
#     data-parallel groups + ZeRO-1; with a capacity factor (overflow dropped per micro-batch) on
#     1, 2 and 4 shards;
#   - sigma_moe (N_E 4, K 2, expert dropout 0.1) on 1, 2 and 4 shards;
#   - a checkpoint of the 1-rank run (step 6) resumes bit-identically with 2 and 4 shards;
#   - the dry run of 4 ranks accounts the sharded experts and their exchange; 3 shards of 4 experts
#     and checkpoints of sharded experts are config errors naming their keys.
source "$(dirname "$0")/common.sh"
source "$src/tests/cli/exact.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
common=(--set data.path=ts.h5 --set run.out_dir=runs --set run.threads=1 --set train.sample_tokens=16
        --set train.micro_batch=2 --set train.log_every=1 --set train.eval_every=0 --set train.final_eval_windows=6
        --set train.max_steps=12 --set model.d_model=32 --set model.intermediate=64 --set model.channel_mixer=moe
        --set model.moe_experts=4 --set model.moe_topk=2)
ep() { echo --set parallel.expert_parallel="$1"; }
cap=(--set model.moe_capacity_factor=1)
sig=(--set model.channel_mixer=sigma_moe --set model.sigma_moe_experts=4 --set model.sigma_moe_topk=2
     --set model.sigma_moe_group=16 --set model.sigma_moe_dropout=0.1)
run_np m1 1 4 --set checkpoint.every_steps=6
run_np m2 2 2
run_np m2e1 2 2 $(ep 1)
run_np m4 4 1
run_np m4e2z 4 1 $(ep 2) --set parallel.zero1=true
run_np c1 1 4 "${cap[@]}"
run_np c2 2 2 "${cap[@]}"
run_np c4 4 1 "${cap[@]}"
run_np s1 1 4 "${sig[@]}"
run_np s2 2 2 "${sig[@]}"
run_np s4 4 1 "${sig[@]}"
grep -q "sharded over 2 ranks: this rank holds experts \[0, 2)" m2.log || { cat m2.log; fail "no shard line"; }
grep -q "sharded over 4 ranks: this rank holds experts \[0, 1)" m4.log || fail "no shard line at 4 ranks"
grep -q "sharded over 2 ranks" m4e2z.log || fail "no shard line at 4 ranks, 2 shards"
grep -q "experts (moe): 4 per block; .* (replicated)" m1.log || fail "1 rank should replicate"
grep -q "(replicated)" m2e1.log || fail "expert_parallel 1 should replicate"
[[ -s runs/m2/samples.txt ]] || fail "no sample from the assembled model"
same_runs --rows 13 m1 m2 m2e1 m4 m4e2z
# A replicated checkpoint (1 rank) resumes with the experts sharded: each rank reads its experts.
ck=runs/m1/checkpoints/step_6
run_np r2 2 2 --resume "$ck"
run_np r4 4 1 --resume "$ck"
grep -q "resumed from" r4.log || fail "r4 did not resume"
same_resume m1 6 r2 r4
same_runs --rows 13 c1 c2 c4
same_runs --rows 13 s1 s2 s4
/usr/bin/python3 - <<'PY'
import json
def losses(name):
    return [json.loads(l)["loss"] for l in open(f"runs/{name}/metrics.jsonl")]
assert losses("m1") != losses("c1"), "the capacity factor dropped nothing"
PY
# The plan of 4 ranks: a quarter of the experts per rank, and the exchange of the routed rows.
"$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=plan --dry-run --world 4 --expert-parallel 4 > plan.log
grep -q "sharded over 4 ranks: this rank holds experts \[0, 1)" plan.log || { cat plan.log; fail "plan: no shard line"; }
grep -Eq "expert exchange .* = [1-9][0-9]* \(uniform routing\)" plan.log || { cat plan.log; fail "plan: no exchange bytes"; }
expect_error "3 shards of 4 experts" "parallel.expert_parallel = 3 must divide the number of experts model.moe_experts = 4" \
  "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=bad --dry-run --world 3 --expert-parallel 3
expect_error "checkpoints of sharded experts" "checkpoint.every_steps = 0" \
  mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=bad2 --set checkpoint.every_steps=5
echo "ok: expert-parallel moe and sigma_moe (1/2/4 shards, replicated, ZeRO-1, capacity drops, expert dropout) equal one rank bit for bit"
