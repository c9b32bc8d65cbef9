# Preemption: SIGTERM (or SIGINT, or Slurm's warning SIGUSR1) during training finishes the current step, writes a complete
# checkpoint at that step and exits 0 with a message; --resume auto then continues with the losses
# of an uninterrupted run. With 2 ranks a signal that reaches only one rank still stops both (the
# flag is agreed by an all-reduce) and the job exits 0.
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
# A constant schedule after warmup: the learning rate does not depend on train.max_steps, so a run
# started with a huge max_steps and stopped by a signal can be compared with a 600-step one.
common=(--set data.path=ts.h5 --set run.out_dir=runs --set run.threads=1 --set train.sample_tokens=0
        --set train.log_every=1 --set train.eval_every=0 --set train.final_eval_windows=4 --set optim.schedule=constant)
wait_for_steps() {  # wait_for_steps RUN N: until metrics.jsonl has N lines
  for _ in $(seq 1 300); do
    [[ -f runs/$1/metrics.jsonl && $(wc -l < runs/$1/metrics.jsonl) -ge $2 ]] && return 0
    sleep 0.05
  done
  fail "$1 never reached step $2"
}
"$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=ref --set train.max_steps=600 > ref.log

for sig in TERM INT USR1; do
  name=sig$sig
  "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=$name --set train.max_steps=1000000 > $name.log 2>&1 &
  pid=$!
  wait_for_steps $name 20
  kill -$sig $pid
  status=0
  wait $pid || status=$?
  [[ $status -eq 0 ]] || { cat $name.log; fail "SIG$sig: exit status $status, expected 0"; }
  step=$(grep -Eo "received SIG$sig: stopped after step [0-9]+" $name.log | grep -Eo "[0-9]+$") || { tail $name.log; fail "SIG$sig: no message"; }
  (( step < 600 )) || fail "SIG$sig: stopped only at step $step"
  [[ -f runs/$name/checkpoints/step_$step/COMPLETE ]] || fail "SIG$sig: no complete checkpoint at step $step"
  last=$(tail -1 runs/$name/metrics.jsonl | /usr/bin/python3 -c "import json,sys; print(json.load(sys.stdin)['step'])")
  [[ $last -eq $step ]] || fail "SIG$sig: metrics end at step $last, checkpoint at $step"
  echo "ok: SIG$sig -> exit 0, checkpoint at step $step: $(grep "received SIG" $name.log)"
  "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=$name --set train.max_steps=600 --resume auto > $name.resume.log
  /usr/bin/python3 - runs/ref/metrics.jsonl runs/$name/metrics.jsonl <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
assert [r["step"] for r in a] == [r["step"] for r in b]
assert [r["loss"] for r in a] == [r["loss"] for r in b], "resumed losses differ from the uninterrupted run"
print("ok: resumed after the signal, 600 steps bit-identical to the uninterrupted run")
PY
done

# 2 ranks with ZeRO-1: SIGTERM to rank 1 only.
mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set parallel.zero1=true --set run.name=mpi \
    --set train.max_steps=1000000 > mpi.log 2>&1 &
job=$!
wait_for_steps mpi 20
ranks=$(pgrep -f "run.name=mpi" | while read -r p; do [[ "$(cat /proc/$p/comm 2>/dev/null)" == peerless ]] && echo "$p"; done)
[[ $(echo "$ranks" | wc -l) -eq 2 ]] || fail "expected 2 rank processes, found: $ranks"
kill -TERM "$(echo "$ranks" | sed -n 2p)"
status=0
wait $job || status=$?
[[ $status -eq 0 ]] || { cat mpi.log; fail "2 ranks: exit status $status after SIGTERM, expected 0"; }
step=$(grep -Eo "received SIGTERM: stopped after step [0-9]+" mpi.log | grep -Eo "[0-9]+$") || { tail mpi.log; fail "2 ranks: no message"; }
[[ -f runs/mpi/checkpoints/step_$step/COMPLETE && -f runs/mpi/checkpoints/step_$step/shard_1.h5 ]] || fail "2 ranks: incomplete checkpoint"
"$bin" inspect runs/mpi/checkpoints/step_$step --no-stats > /dev/null || fail "2 ranks: the checkpoint does not verify"
echo "ok: 2 ranks, SIGTERM to rank 1 -> both stopped after step $step with a complete checkpoint, exit 0"
