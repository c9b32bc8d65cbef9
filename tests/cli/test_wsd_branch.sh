# WSD cooldown branches (../shared/SWEEPS.md §2; train.branch_steps, train.init_from). A 30-step wsd
# run keeps a permanent checkpoint at step 16 (past the rotation of checkpoint.keep = 1); a fresh
# 20-step run started from it (init_from) cools down over steps 17-20 and ends bit-identical
# (metrics rows, model.h5 tensors) with a straight 20-step wsd run, whose stable phase ends at
# 20 - round(0.2 * 20) = 16. The branch run's own checkpoint takes priority over init_from on
# --resume auto. Keys that must match are checked (a config error names key and both values).
source "$(dirname "$0")/common.sh"
source "$src/tests/cli/exact.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
common=(--set data.path=ts.h5 --set run.out_dir=runs --set run.threads=1 --set train.sample_tokens=0
        --set train.log_every=1 --set train.eval_every=0 --set train.final_eval_windows=4 --set train.micro_batch=2
        --set optim.schedule=wsd --set model.d_model=64 --set model.intermediate=128)

run_np straight 0 2 --set train.max_steps=20
run_np long 0 2 --set train.max_steps=30 --set train.branch_steps=[16] --set checkpoint.every_steps=5 \
    --set checkpoint.keep=1
ck=runs/long/checkpoints/step_16
[[ -f $ck/KEEP && -f $ck/COMPLETE ]] || { ls runs/long/checkpoints; fail "no permanent checkpoint at step 16"; }
[[ ! -d runs/long/checkpoints/step_15 && -d runs/long/checkpoints/step_30 ]] || fail "rotation did not keep 1 + the branch"
grep -q "branch checkpoint $ck" long.log || { cat long.log; fail "no branch checkpoint line"; }

run_np branch 0 2 --set train.max_steps=20 --set train.init_from="$ck"
grep -q "initialized from (train.init_from) $ck: step 16" branch.log || { cat branch.log; fail "no init_from line"; }
same_resume straight 16 branch

# Own checkpoints first: the branch run interrupted after its step-18 checkpoint continues from it.
run_np branch2 0 2 --set train.max_steps=20 --set train.init_from="$ck" --set checkpoint.every_steps=18
rm runs/branch2/model.h5 && head -2 runs/branch2/metrics.jsonl > m && mv m runs/branch2/metrics.jsonl
run_np branch2 0 2 --set train.max_steps=20 --set train.init_from="$ck" --set checkpoint.every_steps=18 --resume auto
grep -q "resumed from runs/branch2/checkpoints/step_18: step 18" branch2.log || { cat branch2.log; fail "no own resume"; }
same_resume straight 16 branch2

t=("$bin" train "$config" "${common[@]}" --set run.name=bad --set train.accum_steps=2 --set train.max_steps=20)
expect_error "init_from: optim.lr differs" "optim.lr = 0.003 in the checkpoint, 0.002 now" \
    "${t[@]}" --set train.init_from="$ck" --set optim.lr=2e-3
expect_error "init_from: batch differs" "train.micro_batch = 2 in the checkpoint, 3 now" \
    "${t[@]}" --set train.init_from="$ck" --set train.micro_batch=3
expect_error "init_from: no checkpoint" "train.init_from = \"nowhere\"" "${t[@]}" --set train.init_from=nowhere
expect_error "branch step past the end" "key 'train.branch_steps' = \"\[25\]\": step 25 is outside \[1, 20\]" \
    "${t[@]}" --set train.branch_steps=[25]
expect_error "decay_fraction range" "optim.decay_fraction" "${t[@]}" --set optim.decay_fraction=0
echo "ok: wsd branch from a permanent stable-phase checkpoint == straight wsd run, bit for bit"
