# Multi-rank failures end the job quickly and say why: a rank started with a different config is
# refused before step 1, and a rank killed with SIGKILL mid-training ends the whole job within 30 s
# with a message naming the rank.
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
common=(--set data.path=ts.h5 --set run.out_dir=runs --set run.threads=1 --set train.sample_tokens=0)

# Different config on rank 1.
status=0
mpirun --oversubscribe -np 1 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=mismatch : \
       -np 1 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=mismatch --set optim.lr=0.002 \
       > mismatch.out 2>&1 || status=$?
[[ $status -ne 0 ]] || fail "a rank with a different config was accepted"
grep -q "rank 1 has a different effective config than rank 0" mismatch.out || { cat mismatch.out; fail "no clear config mismatch message"; }
[[ ! -s runs/mismatch/metrics.jsonl ]] || fail "training started despite the mismatch"
echo "ok: config mismatch -> $(grep -m1 'different effective config' mismatch.out)"

# SIGKILL one of 4 ranks mid-training.
mpi 4 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=victim --set train.max_steps=100000 \
    --set train.log_every=1 --set train.eval_every=0 > kill.out 2>&1 &
job=$!
for _ in $(seq 1 300); do [[ -s runs/victim/metrics.jsonl ]] && break; sleep 0.1; done
[[ -s runs/victim/metrics.jsonl ]] || { kill -9 $job; cat kill.out; fail "training never started"; }
victim=$(pgrep -f "run.name=victim" | grep -v "^$job\$" | while read -r p; do
  [[ "$(cat /proc/$p/comm 2>/dev/null)" == peerless ]] && echo "$p"; done | sed -n 3p)
[[ -n "$victim" ]] || fail "no rank process found"
start=$(date +%s)
kill -9 "$victim"
status=0
timeout 60 tail --pid=$job -f /dev/null || true
wait $job || status=$?
elapsed=$(( $(date +%s) - start ))
[[ $status -ne 0 ]] || fail "the job exited 0 after a rank was killed"
(( elapsed <= 30 )) || fail "the job took ${elapsed}s to end after a rank was killed"
grep -Eq "rank [0-9]+.*(exited on signal 9|Killed)" kill.out || { cat kill.out; fail "no message naming the killed rank"; }
echo "ok: SIGKILL of one rank ended the job in ${elapsed}s: $(grep -Em1 'rank [0-9]+.*(signal 9|Killed)' kill.out)"
