# Exact resume and resharding (parallel.deterministic, the CPU default; tests/cli/exact.sh compares
# metrics rows and model.h5 tensors with ==). A 30-step run checkpoints at step 15; resuming from
# that checkpoint gives bit-identical rows (loss, grad_norm, lr, tokens seen; steps 16-30 and the
# final validation) and saved tensors (1 rank, and 2 ranks with ZeRO-1). A checkpoint written by 2
# ranks continues on 1 and on 4, and one written by 4 continues on 2, with the global batch kept
# (micro_batch x accum_steps x ranks), bit-identical with the writer's uninterrupted run. With a
# global batch of 12 sequences (micro-batch 1): 1 x 12 == 2 x 6 == 3 x 4 == 4 x 3 for 30 steps, and
# the 2-rank checkpoint of step 10 continues bit-identically on 1, 3 and 4 ranks (ZeRO-1 on 3).
# metrics.jsonl of a resumed run continues after the checkpoint's step.
source "$(dirname "$0")/common.sh"
source "$src/tests/cli/exact.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
common=(--set data.path=ts.h5 --set run.out_dir=runs --set run.threads=1 --set train.sample_tokens=0
        --set train.log_every=1 --set train.eval_every=0 --set train.final_eval_windows=4
        --set train.max_steps=30 --set checkpoint.every_steps=15 --set train.micro_batch=2
        --set model.d_model=64 --set model.intermediate=128)
train() { "$bin" train "$src/configs/tiny.toml" "${common[@]}" "$@"; }

# 1 rank, no ZeRO: uninterrupted, then resumed from step 15 into another run directory.
train --set run.name=r1 --set train.accum_steps=4 > r1.log
train --set run.name=r1b --set train.accum_steps=4 --resume runs/r1/checkpoints/step_15 > r1b.log
grep -q "resumed from runs/r1/checkpoints/step_15: step 15" r1b.log || { cat r1b.log; fail "no resume message"; }
# 2 ranks, ZeRO-1: the same, and resharded to 1 and 4 ranks.
z=(--set parallel.zero1=true)
mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" "${z[@]}" --set run.name=z2 --set train.accum_steps=2 > z2.log
[[ -f runs/z2/checkpoints/step_15/shard_1.h5 ]] || fail "2-rank ZeRO-1 checkpoint lacks rank 1's shard"
mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" "${z[@]}" --set run.name=z2b --set train.accum_steps=2 \
    --resume runs/z2/checkpoints/step_15 > z2b.log
train "${z[@]}" --set run.name=z2to1 --set train.accum_steps=4 --resume runs/z2/checkpoints/step_15 > z2to1.log
mpi 4 "$bin" train "$src/configs/tiny.toml" "${common[@]}" "${z[@]}" --set run.name=z2to4 --set train.accum_steps=1 \
    --resume runs/z2/checkpoints/step_15 > z2to4.log
mpi 4 "$bin" train "$src/configs/tiny.toml" "${common[@]}" "${z[@]}" --set run.name=z4 --set train.accum_steps=1 > z4.log
mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" "${z[@]}" --set run.name=z4to2 --set train.accum_steps=2 \
    --resume runs/z4/checkpoints/step_15 > z4to2.log
grep -q "written by 4 ranks (ZeRO-1 on), continuing on 2" z4to2.log || { cat z4to2.log; fail "no reshard message"; }

same_resume r1 15 r1b
same_resume z2 15 z2b z2to1 z2to4
same_resume z4 15 z4to2

# A global batch of 12 sequences: 1, 2, 3 and 4 ranks; the 2-rank checkpoint of step 10 on 1, 3, 4.
g=(--set train.micro_batch=1 --set checkpoint.every_steps=10)
run_np g1 0 12 "${g[@]}"
run_np g2 2 6 "${g[@]}"
run_np g3 3 4 "${g[@]}"
run_np g4 4 3 "${g[@]}" --set parallel.zero1=true
ck=runs/g2/checkpoints/step_10
run_np g2to1 0 12 "${g[@]}" --resume "$ck"
run_np g2to3 3 4 "${g[@]}" --set parallel.zero1=true --resume "$ck"
run_np g2to4 4 3 "${g[@]}" --resume "$ck"
grep -q "written by 2 ranks (ZeRO-1 off), continuing on 3" g2to3.log || { cat g2to3.log; fail "no reshard message 2 -> 3"; }
same_runs --rows 31 g1 g2 g3 g4
same_resume g2 10 g2to1 g2to3 g2to4

# --resume auto in the run's own directory: metrics.jsonl keeps steps 1-15 and continues.
cp -r runs/r1 runs/r1c
head -20 runs/r1c/metrics.jsonl > m && mv m runs/r1c/metrics.jsonl   # the interrupted run got to step 20
rm -rf runs/r1c/checkpoints/step_30 && echo step_15 > runs/r1c/checkpoints/latest
sed -i 's/"r1"/"r1c"/' runs/r1c/config.toml
train --set run.name=r1c --set train.accum_steps=4 --resume auto > r1c.log
/usr/bin/python3 - <<'PY'
import json
a = [json.loads(l) for l in open("runs/r1/metrics.jsonl")]
b = [json.loads(l) for l in open("runs/r1c/metrics.jsonl")]
assert [r["step"] for r in b[:-1]] == list(range(1, 31)), [r["step"] for r in b]
print("ok: resume auto continues metrics.jsonl after step 15")
PY
same_runs --rows 31 r1 r1c
echo "ok: exact resume (1 rank, 2 ranks ZeRO-1) and bit-identical resharding 2->1, 2->4, 4->2, 2->3 (global batch 12)"

# Tensors whose sizes are not multiples of the layout's 16-element alignment (d_model 24: gains of 24
# elements): the checkpoint's global offsets are padded like the layout's (they once were not, and
# such a model could not write a checkpoint). 1 rank, and 2 ranks with ZeRO-1 continued on 1.
pad=(--set model.d_model=24 --set model.intermediate=40)
train "${pad[@]}" --set run.name=p1 --set train.accum_steps=4 > p1.log
train "${pad[@]}" --set run.name=p1b --set train.accum_steps=4 --resume runs/p1/checkpoints/step_15 > p1b.log
mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" "${pad[@]}" "${z[@]}" --set run.name=p2 \
    --set train.accum_steps=2 > p2.log
train "${pad[@]}" "${z[@]}" --set run.name=p2to1 --set train.accum_steps=4 --resume runs/p2/checkpoints/step_15 > p2to1.log
same_resume p1 15 p1b
same_resume p2 15 p2to1
echo "ok: exact resume with padded tensors (d_model 24), 1 rank and 2 -> 1 ranks with ZeRO-1"
