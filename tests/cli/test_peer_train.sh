# A small model with a PEER layer in block 0 (d 32, N = 64^2 experts, h 2, k 4) trains 20 steps on
# Tiny Shakespeare bytes: 1 rank with 2 accumulation steps, 2 ranks with 1 and 2 ranks with ZeRO-1
# (the same global batch) are bit-identical (parallel.deterministic, the CPU default;
# tests/cli/exact.sh): == training losses, gradient norms, PEER usage / KL (counted over the global
# batch), the final validation loss (which uses the query BatchNorm running statistics) and every
# model.h5 tensor (tables, keys, BN buffers). metrics.jsonl carries peer_usage / peer_kl; a
# checkpoint at step 10 + --resume gives bit-identical rows and tensors afterwards.
# Lazy Adam (optim.table_optimizer = lazy_adam): 1 rank x 2 accumulation, 2 ranks and 2 ranks with
# ZeRO-1 agree the same way (a row retrieved on one rank only must be updated on both: the touched
# flags are all-reduced), and differ from dense AdamW (not every one of the 4,096 rows is touched).
# optim.table_lr_scale = 3 (which made rounding differences grow through top-k flips before the
# deterministic mode) is bit-identical on 1 and 2 ranks as well.
source "$(dirname "$0")/common.sh"
source "$src/tests/cli/exact.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
common=(--set data.path=ts.h5 --set run.out_dir=runs --set run.threads=1 --set train.sample_tokens=0
        --set train.micro_batch=2 --set train.log_every=1 --set train.eval_every=0 --set train.final_eval_windows=4
        --set model.d_model=32 --set model.intermediate=64 --set model.peer_blocks=0 --set model.peer_n_sub=64
        --set model.peer_heads=2 --set model.peer_topk=4 --set model.peer_key_dim=16 --set checkpoint.every_steps=10)
run_np p1 0 2
run_np p2 2 1
run_np p2z 2 1 --set parallel.zero1=true
lazy=(--set optim.table_optimizer=lazy_adam)
run_np l1 0 2 "${lazy[@]}"
run_np l2 2 1 "${lazy[@]}"
run_np l2z 2 1 "${lazy[@]}" --set parallel.zero1=true
run_np s1 0 2 --set optim.table_lr_scale=3
run_np s2 2 1 --set optim.table_lr_scale=3
run_np p1r 0 2 --resume runs/p1/checkpoints/step_10
grep -q "PEER: 1 layer(s) in block(s) 0, N = 4,096 experts" p1.log || { cat p1.log; fail "no PEER memory accounting"; }
grep -q "PEER reference (d 1024, N 1024^2, 8 ranks)" p1.log || fail "no PEER reference accounting"
grep -q "peer0 usage" p1.log || fail "progress line lacks PEER usage"
grep -q "resumed from runs/p1/checkpoints/step_10" p1r.log || { cat p1r.log; fail "p1r did not resume"; }
same_runs --rows 21 p1 p2 p2z
same_runs --rows 21 l1 l2 l2z
same_runs --rows 21 s1 s2
same_resume p1 10 p1r
/usr/bin/python3 - <<'PY'
import json
def rows(name):
    return [json.loads(l) for l in open(f"runs/{name}/metrics.jsonl")]
base = rows("p1")
for r in base[:-1]:
    assert len(r["peer_usage"]) == 1 and len(r["peer_kl"]) == 1, r
    assert 0 < r["peer_usage"][0] <= 1 and r["peer_kl"][0] >= 0, r
assert any(a["loss"] != b["loss"] for a, b in zip(base[1:], rows("l1")[1:])), "lazy Adam changed nothing"
assert any(a["loss"] != b["loss"] for a, b in zip(base[1:], rows("s1")[1:])), "table_lr_scale changed nothing"
PY
echo "ok: PEER trains bit-identically on 1 and 2 ranks (with and without ZeRO-1, lazy Adam, table lr scale) and resumes exactly"
