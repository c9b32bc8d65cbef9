# Expert parallelism (model/expert_parallel.h): the PEER table (N = 64² experts, d 32, h 2, k 4)
# sharded by rows trains bit for bit like one rank (parallel.deterministic, the CPU default;
# tests/cli/exact.sh compares metrics rows and model.h5 tensors with ==), 30 steps:
#   - global batch 8 (micro-batch 2): mpirun -np 1 x 4 accumulation == 2 ranks x 2 with 2 shards
#     (expert_parallel 0 = all ranks) == 2 ranks x 2 replicated (expert_parallel 1) == 4 ranks x 1
#     with 4 shards == 4 ranks with 2 shards x 2 data-parallel groups + ZeRO-1; with dense AdamW,
#     with lazy Adam (1/2/4 shards) and with ternary expert copies (model.peer_ternary: one β per
#     table from the whole table, 1/2/4 shards);
#   - global batch 12 (micro-batch 1): 1 rank x 12 == 2 ranks x 6 (2 shards) == 3 ranks x 4
#     (replicated: 3 does not divide 4096) == 4 ranks x 3 (4 shards);
#   - a checkpoint written at step 10 with the table in 2 shards resumes bit-identically (steps
#     11-30, the final validation and the saved tensors equal the uninterrupted 2-rank run) on 2
#     ranks (same layout), on 1, on 4 (4 shards; 2 shards + ZeRO-1) and, with the global batch of 12,
#     on 3 ranks (replicated), 1 and 4;
#   - 3 shards of 4096 experts are a config error naming parallel.expert_parallel.
source "$(dirname "$0")/common.sh"
source "$src/tests/cli/exact.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
common=(--set data.path=ts.h5 --set run.out_dir=runs --set run.threads=1 --set train.sample_tokens=16
        --set train.micro_batch=2 --set train.log_every=1 --set train.eval_every=0 --set train.final_eval_windows=6
        --set train.max_steps=30 --set model.d_model=32 --set model.intermediate=64 --set model.peer_blocks=0
        --set model.peer_n_sub=64 --set model.peer_heads=2 --set model.peer_topk=4 --set model.peer_key_dim=16)
ep() { echo --set parallel.expert_parallel="$1"; }
lazy=(--set optim.table_optimizer=lazy_adam)
tern=(--set model.peer_ternary=true)
run_np d1 1 4
run_np d2 2 2 --set checkpoint.every_steps=10
run_np d2e1 2 2 $(ep 1)
run_np d4 4 1
run_np d4e2z 4 1 $(ep 2) --set parallel.zero1=true
run_np l1 1 4 "${lazy[@]}"
run_np l2 2 2 "${lazy[@]}"
run_np l4 4 1 "${lazy[@]}"
run_np t1 1 4 "${tern[@]}"
run_np t2 2 2 "${tern[@]}"
run_np t4 4 1 "${tern[@]}"
grep -q "sharded by rows over 2 ranks: this rank holds rows \[0, 2048)" d2.log || { cat d2.log; fail "no shard line"; }
grep -q "sharded by rows over 4 ranks" d4.log || fail "no shard line at 4 ranks"
grep -q "sharded by rows over 2 ranks" d4e2z.log || fail "no shard line at 4 ranks, 2 shards"
grep -q "(replicated)" d1.log || fail "1 rank should replicate"
grep -q "(replicated)" d2e1.log || fail "expert_parallel 1 should replicate"
# Resume the 2-shard checkpoint of step 10 on 2 (same layout), 1 and 4 ranks.
ck=runs/d2/checkpoints/step_10
run_np r2 2 2 --resume "$ck"
run_np r1 1 4 --resume "$ck"
run_np r4 4 1 --resume "$ck"
run_np r4e2z 4 1 $(ep 2) --set parallel.zero1=true --resume "$ck"
grep -q "resumed from" r4.log || fail "r4 did not resume"
[[ -s runs/d2/samples.txt ]] || fail "no sample from the assembled model"
same_runs --rows 31 d1 d2 d2e1 d4 d4e2z
same_runs --rows 31 l1 l2 l4
same_runs --rows 31 t1 t2 t4
same_resume d2 10 r2 r1 r4 r4e2z
# A global batch of 12 sequences splits over 3 ranks as well (micro-batch 1).
g=(--set train.micro_batch=1)
run_np g1 0 12 "${g[@]}"
run_np g2 2 6 "${g[@]}" --set checkpoint.every_steps=10
run_np g3 3 4 "${g[@]}" $(ep 1)
run_np g4 4 3 "${g[@]}"
grep -q "(replicated)" g3.log || fail "3 ranks with expert_parallel 1 should replicate"
ck=runs/g2/checkpoints/step_10
run_np g2to1 0 12 "${g[@]}" --resume "$ck"
run_np g2to3 3 4 "${g[@]}" $(ep 1) --resume "$ck"
run_np g2to4 4 3 "${g[@]}" --resume "$ck"
same_runs --rows 31 g1 g2 g3 g4
same_resume g2 10 g2to1 g2to3 g2to4
/usr/bin/python3 - <<'PY'
import json
def losses(name):
    return [json.loads(l)["loss"] for l in open(f"runs/{name}/metrics.jsonl")]
assert losses("d1") != losses("l1"), "lazy Adam changed nothing"
assert losses("d1") != losses("t1"), "ternary expert copies changed nothing"
PY
expect_error "3 shards of 4096 experts" "parallel.expert_parallel = 3 must divide the number of experts N = model.peer_n_sub² = 4096" \
  mpi 3 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=bad
echo "ok: expert-parallel PEER (1/2/4 shards, dense and lazy Adam, ternary copies, ZeRO-1; 3 ranks) equals one rank bit for bit; resharded resume exact"
