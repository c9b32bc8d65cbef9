# Bit-exact comparison of training runs (parallel.deterministic), shared by the data-parallel,
# expert-parallel, resume and OpenBLAS-coretype tests. Sourced after common.sh, in its work dir.
# Not a test itself (CMake registers tests/cli/test_*.sh only).
#
#   config=...; common=(--set ...)   the caller's config file (default configs/tiny.toml) and settings
#   run_np NAME NP ACCUM ARGS...     train runs/NAME on NP ranks (mpirun -np NP; NP = 0: the binary
#                                    alone, no MPI) with train.accum_steps = ACCUM; fails when the run
#                                    fails or, for NP > 1, when the log lacks "data parallel: NP ranks"
#   same_runs [--rows N] REF NAME... every metrics.jsonl row of NAME equals REF's field for field with
#                                    == (loss, grad_norm, val_loss, lr, tokens, PEER usage/KL; all but
#                                    tokens_per_s), and every tensor of model.h5 (all datasets but
#                                    /config, the run name) has the same dtype, shape and bytes
#   same_resume FULL STEP NAME...    NAME (resumed from FULL's checkpoint of step STEP) logged exactly
#                                    FULL's rows after STEP (steps STEP+1.. and the final evaluation),
#                                    equal with ==, and ends with FULL's model.h5 tensors
# The first differing row or tensor is printed before the test fails: no tolerance anywhere.
command -v mpirun >/dev/null || fail "mpirun not found: the multi-rank exactness tests need Open MPI (not skipped)"
config="${config:-$src/configs/tiny.toml}"

run_np() {
  local name="$1" np="$2" accum="$3"
  shift 3
  local cmd=("$bin" train "$config" "${common[@]}" --set run.name="$name" --set train.accum_steps="$accum" "$@")
  if [[ "$np" == 0 ]]; then
    "${cmd[@]}" > "$name.log" 2>&1 || { cat "$name.log"; fail "run $name (1 rank, no MPI)"; }
  else
    mpi "$np" "${cmd[@]}" > "$name.log" 2>&1 || { cat "$name.log"; fail "run $name (mpirun -np $np)"; }
  fi
  if [[ "$np" -gt 1 ]]; then
    grep -q "data parallel: $np ranks, backend mpi" "$name.log" || { cat "$name.log"; fail "run $name: $np ranks did not come up"; }
  fi
  [[ -f "runs/$name/model.h5" ]] || fail "run $name wrote no model.h5"
}

_exact_py() {
  /usr/bin/python3 - "$@" <<'PY'
import json, sys
import h5py, numpy as np

def rows(name):
    out = []
    for line in open(f"runs/{name}/metrics.jsonl"):
        r = json.loads(line)
        r.pop("tokens_per_s", None)   # wall-clock speed: the only field allowed to differ
        out.append(r)
    return out

def tensors(name):
    found = {}
    with h5py.File(f"runs/{name}/model.h5", "r") as f:
        def visit(path, obj):
            if isinstance(obj, h5py.Dataset) and path != "config":
                a = np.asarray(obj[()])
                attrs = sorted((k, np.asarray(v).tobytes()) for k, v in obj.attrs.items())
                found[path] = (a.dtype.str, a.shape, a.tobytes(), a, attrs)
        f.visititems(visit)
    return found

def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)

def same_rows(ref, name, want, got):
    if len(want) != len(got):
        fail(f"{name}: {len(got)} metrics rows, {ref} has {len(want)}")
    for i, (a, b) in enumerate(zip(want, got)):
        if a != b:
            keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            fail(f"{name} differs from {ref} first at metrics row {i} (step {a.get('step')}) in {keys}:\n"
                 f"  {ref}: {json.dumps(a)}\n  {name}: {json.dumps(b)}")

def same_tensors(ref, name):
    want, got = tensors(ref), tensors(name)
    if sorted(want) != sorted(got):
        fail(f"{name}: model.h5 datasets differ from {ref}: only in {ref}: {sorted(set(want) - set(got))}, "
             f"only in {name}: {sorted(set(got) - set(want))}")
    for path in sorted(want):
        (dt, shape, raw, a, at), (dt2, shape2, raw2, b, at2) = want[path], got[path]
        if (dt, shape, at) != (dt2, shape2, at2):
            fail(f"{name}: /{path} is {dt2} {shape2} {at2}, {ref} has {dt} {shape} {at}")
        if raw != raw2:
            a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            x, y = (np.frombuffer(r, np.uint8).reshape(max(a.size, 1), -1) for r in (raw, raw2))
            bad = np.flatnonzero((x != y).any(axis=1))  # by bytes: -0.0 vs 0.0 and NaN payloads count
            first = int(bad[0])
            fail(f"{name}: /{path} differs from {ref} in {bad.size} of {a.size} elements, first at [{first}]: "
                 f"{a64[first]!r} vs {b64[first]!r}; max |diff| {np.abs(a64 - b64).max():.3e}")
    return len(want), sum(len(v[2]) for v in want.values())

mode = sys.argv[1]
if mode == "runs":
    args = sys.argv[2:]
    n_rows = None
    if args[0] == "--rows":
        n_rows, args = int(args[1]), args[2:]
    ref, others = args[0], args[1:]
    base = rows(ref)
    if n_rows is not None and len(base) != n_rows:
        fail(f"{ref}: {len(base)} metrics rows, expected {n_rows}")
    if "val_loss" not in base[-1]:
        fail(f"{ref}: the last metrics row is not the final evaluation: {base[-1]}")
    for name in others:
        same_rows(ref, name, base, rows(name))
        n, size = same_tensors(ref, name)
        print(f"ok: {name} == {ref} bit for bit: {len(base) - 1} steps (loss, grad_norm, lr, tokens"
              + (", PEER usage/KL" if "peer_usage" in base[0] else "") + f"), final val_loss {base[-1]['val_loss']!r}, "
              f"{n} model tensors ({size} bytes)")
elif mode == "resume":
    full, step, resumed = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    tail = [r for r in rows(full) if r["step"] > step]
    if not tail or "val_loss" not in tail[-1]:
        fail(f"{full}: no rows after step {step} ending with the final evaluation")
    for name in resumed:
        got = rows(name)
        if got and got[0]["step"] != step + 1:
            fail(f"{name}: resumed metrics start at step {got[0]['step']}, expected {step + 1}")
        same_rows(full, name, tail, got)
        n, size = same_tensors(full, name)
        print(f"ok: {name} (resumed at step {step}) == {full} bit for bit: steps {step + 1}-{tail[-1]['step']}, "
              f"final val_loss {tail[-1]['val_loss']!r}, {n} model tensors ({size} bytes)")
else:
    fail(f"exact.sh: unknown mode {mode}")
PY
}
same_runs() { _exact_py runs "$@" || fail "not bit-identical (see above)"; }
same_resume() { _exact_py resume "$@" || fail "resume not bit-identical (see above)"; }
