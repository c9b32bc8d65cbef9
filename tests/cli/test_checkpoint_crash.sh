# Crash safety. SIGKILL at each phase of the commit protocol (shard written, index written,
# manifest written, marker written, directory renamed) and at random moments: the previous
# checkpoint still loads and --resume auto uses the newest complete one, and the resumed run gives
# the losses of an uninterrupted one. A truncated shard, a flipped byte, a missing shard, a missing
# marker and a checkpoint of another model each give one clear error naming the file or the keys
# (exit status 1, never a crash); --resume auto skips the damaged checkpoint and says so.
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
common=(--set data.path=ts.h5 --set run.out_dir=runs --set run.threads=1 --set train.sample_tokens=0
        --set train.log_every=1 --set train.eval_every=0 --set train.final_eval_windows=4
        --set train.max_steps=20 --set checkpoint.every_steps=5)
train() { "$bin" train "$src/configs/tiny.toml" "${common[@]}" "$@"; }
same_losses() {  # same_losses RUN: metrics of RUN equal those of the uninterrupted run "ref"
  /usr/bin/python3 - "$1" <<'PY'
import json, sys
a = [json.loads(l) for l in open("runs/ref/metrics.jsonl")]
b = [json.loads(l) for l in open(f"runs/{sys.argv[1]}/metrics.jsonl")]
assert [r["step"] for r in b] == [r["step"] for r in a], [r["step"] for r in b]
assert [r["loss"] for r in b] == [r["loss"] for r in a], sys.argv[1]
PY
}
train --set run.name=ref > ref.log
ls runs/ref/checkpoints | tr '\n' ' ' | grep -q "latest step_10 step_15 step_20" || fail "keep=3 did not prune: $(ls runs/ref/checkpoints)"

# Fault injection at every phase of the checkpoint of step 10 (1 rank), then --resume auto.
for phase in shard index manifest marker rename; do
  status=0
  PEERLESS_CHECKPOINT_FAULT=$phase@10 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=f_$phase \
      > f_$phase.log 2>&1 || status=$?
  [[ $status -eq 137 ]] || { cat f_$phase.log; fail "$phase: expected death by SIGKILL, got status $status"; }
  [[ -f runs/f_$phase/checkpoints/step_5/COMPLETE ]] || fail "$phase: the previous checkpoint is gone"
  expect=5
  [[ $phase == rename ]] && expect=10  # renamed means committed: the new checkpoint is complete
  train --set run.name=f_$phase --resume auto > f_$phase.resume.log 2>&1 || { cat f_$phase.resume.log; fail "$phase: resume failed"; }
  grep -q "resumed from runs/f_$phase/checkpoints/step_$expect: step $expect" f_$phase.resume.log ||
    { cat f_$phase.resume.log; fail "$phase: did not resume from step $expect"; }
  same_losses f_$phase
  ls -a runs/f_$phase/checkpoints | grep -q "^\.tmp" && fail "$phase: leftover temporary directory not cleaned up"
  echo "ok: SIGKILL at phase '$phase' of step 10 -> resume auto from step $expect, losses identical"
done

# 2 ranks with ZeRO-1: rank 0 killed after the shards are written.
status=0
PEERLESS_CHECKPOINT_FAULT=shard@10 mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set parallel.zero1=true \
    --set run.name=f_mpi > f_mpi.log 2>&1 || status=$?
[[ $status -ne 0 ]] || fail "2 ranks: the job survived SIGKILL of rank 0"
mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set parallel.zero1=true --set run.name=f_mpi --resume auto \
    > f_mpi.resume.log 2>&1 || { cat f_mpi.resume.log; fail "2 ranks: resume failed"; }
grep -q "resumed from runs/f_mpi/checkpoints/step_5: step 5" f_mpi.resume.log || { cat f_mpi.resume.log; fail "2 ranks: wrong checkpoint"; }
echo "ok: 2 ranks, SIGKILL during the write -> resume auto from step 5"

# SIGKILL at random moments of a run that checkpoints every step.
for delay in 0.4 0.9 1.5; do
  name=rand_${delay/./_}
  "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=$name --set train.max_steps=100000 \
      --set checkpoint.every_steps=1 --set checkpoint.keep=2 > $name.log 2>&1 &
  pid=$!
  sleep $delay
  kill -9 $pid
  wait $pid 2>/dev/null || true
  train --set run.name=$name --set train.max_steps=100000 --set checkpoint.every_steps=1 --resume auto \
      --set train.time_limit_minutes=0.001 > $name.resume.log 2>&1 || { cat $name.resume.log; fail "resume after SIGKILL at ${delay}s"; }
  grep -Eq "resumed from .*step_[0-9]+: step|no complete checkpoint" $name.resume.log || { cat $name.resume.log; fail "no resume line"; }
  echo "ok: SIGKILL after ${delay}s -> $(grep -Eo 'resumed from [^:]*' $name.resume.log || echo 'no checkpoint yet')"
done

# Damaged checkpoints: explicit --resume names the problem; --resume auto falls back.
damage() {  # damage NAME HOW: copy of the reference run with its newest checkpoint damaged
  cp -r runs/ref runs/$1
  local d=runs/$1/checkpoints/step_20
  case $2 in
    truncate) truncate -s -1000 $d/shard_0.h5 ;;
    flip) /usr/bin/python3 -c "
import sys; p='$d/shard_0.h5'; b=bytearray(open(p,'rb').read()); b[len(b)//2]^=0x10; open(p,'wb').write(b)" ;;
    missing_shard) rm $d/shard_0.h5 ;;
    missing_marker) rm $d/COMPLETE ;;
  esac
}
check_damage() {  # check_damage HOW PATTERN
  damage c_$1 $1
  local status=0
  train --set run.name=c_$1 --resume runs/c_$1/checkpoints/step_20 > c_$1.out 2> c_$1.err || status=$?
  [[ $status -eq 1 ]] || { cat c_$1.err; fail "$1: expected exit status 1, got $status"; }
  grep -Eq "$2" c_$1.err || { cat c_$1.err; fail "$1: error lacks /$2/"; }
  echo "ok: $1 -> $(head -c 250 c_$1.err)"
  train --set run.name=c_$1 --resume auto > c_$1.auto 2>&1 || { cat c_$1.auto; fail "$1: resume auto failed"; }
  grep -q "skipping checkpoint runs/c_$1/checkpoints/step_20" c_$1.auto || { cat c_$1.auto; fail "$1: no skip note"; }
  grep -q "falling back to runs/c_$1/checkpoints/step_15" c_$1.auto || { cat c_$1.auto; fail "$1: no fallback note"; }
  grep -q "resumed from runs/c_$1/checkpoints/step_15: step 15" c_$1.auto || { cat c_$1.auto; fail "$1: wrong fallback"; }
}
check_damage truncate "step_20/shard_0.h5 has [0-9]+ bytes, the manifest says [0-9]+"
check_damage flip "step_20/shard_0.h5 fails its SHA-256 check"
check_damage missing_shard "step_20/shard_0.h5 is missing"
check_damage missing_marker "step_20 is incomplete: its completion marker .*COMPLETE is missing"
echo "ok: damaged checkpoints are refused by name and skipped by --resume auto"

status=0
train --set run.name=other --set model.d_model=48 --set model.n_layers=3 --resume runs/ref/checkpoints/step_20 \
    > other.out 2> other.err || status=$?
[[ $status -eq 1 ]] || { cat other.err; fail "other model: expected exit status 1, got $status"; }
grep -q "model.d_model = 32 in the checkpoint, 48 now" other.err && grep -q "model.n_layers = 2 in the checkpoint, 3 now" other.err ||
  { cat other.err; fail "other model: the differing keys are not named"; }
echo "ok: other model -> $(tr '\n' ' ' < other.err | head -c 300)"
status=0
train --set run.name=nowhere --resume runs/nowhere > nowhere.out 2> nowhere.err || status=$?
[[ $status -eq 1 ]] && grep -q "runs/nowhere" nowhere.err || fail "a missing --resume path is not named"
train --set run.name=lr --set optim.lr=1e-3 --resume runs/ref/checkpoints/step_20 > lr.log
grep -q "config change on resume: optim.lr = 0.003 in the checkpoint, 0.001 now" lr.log || { cat lr.log; fail "no note on a changed lr"; }
echo "ok: a changed optim.lr is allowed and reported"
