# Expert parallelism for PKM (model/pkm_values_parallel.h): the value table (N = 8² rows, d 32, h 2,
# k 4) sharded by rows trains bit for bit like one rank (parallel.deterministic, the CPU default;
# tests/cli/exact.sh compares metrics rows and model.h5 tensors with ==), 20 steps, global batch 8
# (micro-batch 2):
#   - mpirun -np 1 x 4 accumulation == 2 ranks x 2 with 2 shards == 4 ranks x 1 with 4 shards ==
#     4 ranks with 2 shards x 2 data-parallel groups, with dense AdamW; 1 == 2 shards with lazy Adam;
#   - a checkpoint written at step 10 with the table in 2 shards resumes bit-identically (steps
#     11-20, the final validation and the saved tensors equal the uninterrupted 2-rank run) on 1 and
#     on 4 ranks (4 shards);
#   - 3 shards of 64 rows are a config error naming parallel.expert_parallel.
source "$(dirname "$0")/common.sh"
source "$src/tests/cli/exact.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
common=(--set data.path=ts.h5 --set run.out_dir=runs --set run.threads=1 --set train.sample_tokens=16
        --set train.micro_batch=2 --set train.log_every=1 --set train.eval_every=0 --set train.final_eval_windows=4
        --set train.max_steps=20 --set model.d_model=32 --set model.intermediate=64 --set model.channel_mixer=pkm
        --set model.pkm_n_sub=8 --set model.pkm_heads=2 --set model.pkm_topk=4 --set model.pkm_key_dim=16)
ep() { echo --set parallel.expert_parallel="$1"; }
lazy=(--set optim.table_optimizer=lazy_adam)
run_np p1 1 4
run_np p2 2 2 --set checkpoint.every_steps=10
run_np p4 4 1
run_np p4e2 4 1 $(ep 2)
run_np l1 1 4 "${lazy[@]}"
run_np l2 2 2 "${lazy[@]}"
ck=runs/p2/checkpoints/step_10
run_np r1 1 4 --resume "$ck"
run_np r4 4 1 --resume "$ck"
grep -q "resumed from" r4.log || fail "r4 did not resume"
grep -q "ep 0/2" p2.log && grep -Eq "expert exchange [1-9]" p2.log || { cat p2.log; fail "p2 did not shard the values"; }
grep -q "ep 0/4" p4.log || fail "p4 did not shard the values over 4 ranks"
same_runs --rows 21 p1 p2 p4 p4e2
same_runs --rows 21 l1 l2
same_resume p2 10 r1 r4
/usr/bin/python3 - <<'PY'
import json
def losses(name):
    return [json.loads(l)["loss"] for l in open(f"runs/{name}/metrics.jsonl")]
assert losses("p1") != losses("l1"), "lazy Adam changed nothing"
assert losses("p1")[-1] < losses("p1")[0], "the loss did not fall"
PY
expect_error "3 shards of 64 rows" "parallel.expert_parallel = 3 must divide the PKM value rows N = model.pkm_n_sub² = 64" \
  mpi 3 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=bad
echo "ok: expert-parallel PKM values (1/2/4 shards, 2 shards x 2 replicas, dense and lazy Adam) equal one rank bit for bit; resharded resume exact"
