#!/usr/bin/env bash
# The collective timeout, end to end: under mpirun -np 2, rank 1 skips an all_reduce that rank 0
# waits in, with a 3 s timeout. The job must fail (exit status != 0) within 30 s, and the message
# must name the collective. Usage: check_timeout.sh MPIEXEC TEST_BINARY
set -u
mpiexec=$1 binary=$2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s)
PEERLESS_EXPECT_WORLD=2 "$mpiexec" --allow-run-as-root --oversubscribe -np 2 "$binary" --timeout-scenario >"$log" 2>&1
status=$?
elapsed=$(( $(date +%s) - start ))
cat "$log"
fail() { echo "check_timeout: FAILED: $*" >&2; exit 1; }
[ "$status" -ne 0 ] || fail "the job exited 0; a hung collective must fail it"
[ "$elapsed" -lt 30 ] || fail "the job took ${elapsed} s; the 3 s timeout should end it within ~10 s"
grep -q "rank 0 @ .*: collective all_reduce (1 f32) did not complete within 3 s" "$log" ||
  fail "no message naming the hung collective (want 'rank 0 @ host: collective all_reduce (1 f32) did not complete within 3 s')"
echo "check_timeout: ok (exit status $status after ${elapsed} s)"
