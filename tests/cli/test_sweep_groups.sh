# `peerless sweep` with groups of 2 ranks (sweep.ranks_per_point = 2 under mpirun -np 4): two groups
# claim 3 points between them, each point trains data-parallel on its group, and the results equal
# bit for bit those of 1-rank groups with the same global batch and micro-batch (2 sequences x 2
# ranks = 2 x 2 accumulation steps; parallel.deterministic): SWEEPS.md §5 "results must not depend
# on g".
source "$(dirname "$0")/common.sh"
command -v mpirun >/dev/null || fail "mpirun is missing (the sweep group test runs under mpirun -np 4)"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
base() {  # base ACCUM_STEPS
  printf '[run]\nseed = 3\nthreads = 1\n[model]\nd_model = 32\nn_layers = 1\nintermediate = 64\n'
  printf '[data]\npath = "ts.h5"\nseq_len = 32\n[train]\nmicro_batch = 2\naccum_steps = %d\nmax_steps = 6\nlog_every = 1\n' "$1"
  printf 'eval_every = 0\nfinal_eval_windows = 4\nsample_tokens = 0\n[optim]\nlr = 3e-3\nwarmup_steps = 2\n'
}
base 1 > base1.toml
base 2 > base2.toml
for g in 1 2; do
  b=$((g == 2 ? 1 : 2))
  printf '[sweep]\nname = "g%d"\nbase = "base%d.toml"\nranks_per_point = %d\n[[sweep.axis]]\n"optim.lr" = [1e-3, 2e-3, 3e-3]\n' \
    "$g" "$b" "$g" > g$g.toml
done
mpi 4 "$bin" sweep run g2.toml --dir g2 > g2.log 2>&1 || { cat g2.log; fail "the 2-rank-group sweep failed"; }
grep -q "2 group(s) of 2 rank(s)" g2.log || { cat g2.log; fail "no 2 groups of 2 ranks"; }
for log in g2/points/*/train.log; do
  grep -q "data parallel: 2 ranks" "$log" || { cat "$log"; fail "$log: the point did not train on 2 ranks"; }
done
mpi 2 "$bin" sweep run g1.toml --dir g1 > g1.log 2>&1 || { cat g1.log; fail "the 1-rank-group sweep failed"; }
/usr/bin/python3 - <<'PY'
import csv, json
def rows(d): return {r["name"]: r for r in csv.DictReader(open(f"{d}/results.csv"))}
a, b = rows("g2"), rows("g1")
assert sorted(a) == sorted(b) and len(a) == 3, (sorted(a), sorted(b))
for name in a:
    assert a[name]["status"] == b[name]["status"] == "done", (name, a[name]["status"], b[name]["status"])
    assert a[name]["batch"] == b[name]["batch"], ("global batch", a[name]["batch"], b[name]["batch"])
    la = [json.loads(l)["loss"] for l in open(f"g2/points/{a[name]['id']}/metrics.jsonl")]
    lb = [json.loads(l)["loss"] for l in open(f"g1/points/{b[name]['id']}/metrics.jsonl")]
    assert la == lb, (name, la, lb)
    assert a[name]["val_loss"] == b[name]["val_loss"], (name, a[name]["val_loss"], b[name]["val_loss"])
print("ok: 3 points on 2 groups of 2 ranks == on 1-rank groups, bit for bit (losses and val_loss)")
PY
echo "ok: sweep groups"
