# Sourced by the command-line tests: $1 = peerless binary, $2 = source directory.
set -euo pipefail
bin="$1"
src="$2"
export PYTHONPATH="$src/tests/cli${PYTHONPATH:+:$PYTHONPATH}"  # run_compare.py for the inline Python
shared="${PEERLESS_SHARED:-$src/../shared}/data"
[[ -f "$shared/tinyshakespeare/input.txt" ]] || { echo "FAIL: shared data missing at $shared"; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

fail() { echo "FAIL: $*"; exit 1; }

# expect_error NAME PATTERN CMD...: CMD must exit non-zero and print PATTERN (grep -E) on stderr.
expect_error() {
  local name="$1" pattern="$2"
  shift 2
  local status=0
  "$@" >"$work/out.txt" 2>"$work/err.txt" || status=$?
  [[ $status -ne 0 ]] || fail "$name: exited 0"
  grep -Eq "$pattern" "$work/err.txt" || { cat "$work/err.txt"; fail "$name: stderr lacks /$pattern/"; }
  echo "ok: $name -> $(head -c 300 "$work/err.txt" | tr '\n' ' ')"
}

# Open MPI as root on a 2-core machine: allow root, oversubscribe, yield when idle.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
export OMPI_MCA_rmaps_base_oversubscribe=1
mpi() { mpirun --oversubscribe -np "$@"; }
