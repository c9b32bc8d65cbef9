# WSD cooldown branches in `peerless sweep` (docs/sweeps.md, ../shared/SWEEPS.md §2) under mpirun -np 2,
# one rank per point: 2 sizes x 3 targets (tokens/param) give per size one stable point, which stops
# where the longest target starts cooling and keeps a checkpoint at every target's decay start, and
# three branch points that start from those checkpoints (train.init_from). Checks: the stable runs'
# steps and kept checkpoints, each branch's "initialized from" line, results.csv (parent_id, status
# "stable" vs "done"), `sweep status`, `fit` on the 6 branches only, and two branches bit-identical
# (metrics rows, model.h5 tensors) to straight wsd runs of their length. Then a single-point sweep
# (a group waits for the stable run's first checkpoint) and one whose stable run fails: its branches
# are blocked with the parent's reason and the job ends.
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
cat > base.toml <<'TOML'
[run]
seed = 7
threads = 1
[model]
d_model = 32
n_layers = 1
intermediate = 64
[data]
path = "ts.h5"
seq_len = 32
[train]
micro_batch = 2
max_steps = 8
log_every = 1
eval_every = 0
final_eval_windows = 4
sample_tokens = 0
[optim]
lr = 3e-3
warmup_steps = 2
schedule = "wsd"
[checkpoint]
every_steps = 5
keep = 1
TOML
config="$PWD/base.toml"
source "$src/tests/cli/exact.sh"
common=(--set data.path=ts.h5 --set run.out_dir=runs)

cat > sweep.toml <<'TOML'
[sweep]
name = "branches"
base = "base.toml"
branch_tokens_per_param = [0.1, 0.2, 0.3]
[[sweep.axis]]
"model.d_model" = [16, 32]
TOML
"$bin" sweep plan sweep.toml > plan.txt
cat plan.txt
[[ $(grep -c '^[0-9a-f]\{12\} ' plan.txt) -eq 8 ]] || fail "plan does not list 2 stable + 6 branch points"
grep -q "d16-stable .*stable: checkpoints at " plan.txt || fail "plan does not mark the stable point"

mpi 2 "$bin" sweep run sweep.toml --dir sd > run.log 2>&1 || { cat run.log; fail "the branched sweep failed"; }
cat run.log
"$bin" sweep status sd > status.txt
cat status.txt
grep -q "d16-stable .* stable " status.txt || fail "status does not show the finished stable run as stable"
grep -q "8 points: done 6 stable 2" status.txt || fail "status does not count 6 done branches and 2 stable runs"

# Steps, checkpoints, init lines and results.csv; prints "name id parent n0 steps d_model" per branch.
/usr/bin/python3 - sd > branches.txt <<'PY'
import csv, json, os, sys
d = sys.argv[1]
rows = {r["name"]: r for r in csv.DictReader(open(f"{d}/results.csv"))}
assert len(rows) == 8, sorted(rows)
def decay_start(T): return T - max(1, round(0.2 * T))  # wsd_decay_start for decay_fraction 0.2 (no .5 ties here)
for size in (16, 32):
    st = rows[f"d{size}-stable"]
    assert st["status"] == "stable" and st["schedule"] == "wsd-stable" and st["parent_id"] == "", st
    br = [rows[f"d{size}-tpp{t}"] for t in ("0.1", "0.2", "0.3")]
    n_active = int(st["n_active"])
    for r, tpp in zip(br, (0.1, 0.2, 0.3)):
        T = round(tpp * n_active / 64)
        n0 = decay_start(T)
        assert r["status"] == "done" and r["parent_id"] == st["id"] and int(r["steps"]) == T, r
        assert r["schedule"] == "wsd" and float(r["val_loss"]) > 0 and int(r["attempts"]) == 1, r
        assert int(r["tokens"]) == 64 * T, r
        ck = f"{d}/points/{st['id']}/checkpoints/step_{n0}"
        assert os.path.exists(f"{ck}/KEEP") and os.path.exists(f"{ck}/COMPLETE"), ck
        log = open(f"{d}/points/{r['id']}/train.log").read()
        assert f"initialized from (train.init_from) {ck}: step {n0}" in log, log[-2000:]
        steps = [json.loads(l)["step"] for l in open(f"{d}/points/{r['id']}/metrics.jsonl")]
        assert steps[0] == n0 + 1 and steps[-1] == T, (r["name"], steps[:2], steps[-2:])
        print(r["name"], r["id"], st["id"], n0, T, size)
    # The stable run trains the longest target's schedule up to its decay start, never cooling.
    n0_max = decay_start(round(0.3 * n_active / 64))
    assert int(st["steps"]) == n0_max and int(st["attempts"]) == 1, st
    m = [json.loads(l) for l in open(f"{d}/points/{st['id']}/metrics.jsonl")]
    assert m[-1]["step"] == n0_max and "val_loss" in m[-1], m[-1]
    assert all(abs(x.get("lr", 3e-3) - 3e-3) < 1e-15 for x in m if x["step"] >= 2), [x["lr"] for x in m]
print("ok: 2 stable runs stop at 0.8 T_max with kept checkpoints; 6 branches from them, rows with parent_id",
      file=sys.stderr)
PY
cat branches.txt

# A middle target and the longest one (the stable run's own decay start), each against a straight
# wsd run of its length with the same config: metrics rows and model tensors bit for bit.
mkdir -p runs
for name in d16-tpp0.2 d32-tpp0.3; do
  read -r _ id _ n0 T size < <(grep "^$name " branches.txt)
  run_np "straight-$name" 0 1 --set model.d_model="$size" --set train.max_steps="$T"
  ln -s "$PWD/sd/points/$id" "runs/branch-$name"
  same_resume "straight-$name" "$n0" "branch-$name"
done

# The fit reads the 6 cooled branches only (status done), never the stable runs.
"$bin" fit sd/results.csv --bootstrap 10 --out fit > fit.txt 2>&1 || { cat fit.txt; fail "fit of the branches failed"; }
grep -q "fit: 6 points (of 8 rows)" fit.txt || { cat fit.txt; fail "fit did not take exactly the 6 branches"; }
/usr/bin/python3 -c "
import json; names = [p['name'] for p in json.load(open('fit/fit.json'))['points']]
assert len(names) == 6 and not [n for n in names if 'stable' in n], names"
echo "ok: fit on the 6 branches"

# One grid point, two groups: the second group waits for the stable run's first kept checkpoint
# (branches are claimable only once it is complete), then every point runs exactly once.
printf '[sweep]\nbase = "base.toml"\nbranch_max_steps = [10, 20, 40]\n' > one.toml
mpi 2 "$bin" sweep run one.toml --dir od > one.log 2>&1 || { cat one.log; fail "the one-point branched sweep failed"; }
"$bin" sweep status od > one_status.txt
cat one_status.txt
grep -q "4 points: done 3 stable 1" one_status.txt || fail "one-point sweep: expected 3 done branches and 1 stable"
for a in od/points/*/attempts.log; do [[ $(wc -l < "$a") -eq 1 ]] || fail "$a: a point started more than once"; done
grep -q "waiting for branch checkpoints" one.log && echo "ok: a group waited for a branch checkpoint"

# A stable run that fails (no data file): FAILED.1, FAILED.2, its branches blocked with that reason.
cat > bad.toml <<'TOML'
[sweep]
base = "base.toml"
branch_max_steps = [10, 20]
[[sweep.point]]
name = "bad"
"model.vocab_size" = 256
"data.path" = "missing.h5"
TOML
mpi 2 "$bin" sweep run bad.toml --dir bd > bad.log 2>&1 || { cat bad.log; fail "a failing stable run failed the sweep"; }
"$bin" sweep status bd > bad_status.txt
cat bad_status.txt
grep -q "bad-stable .*failed 2" bad_status.txt || fail "the stable run is not reported failed"
[[ $(grep -c "bad-steps[0-9]* .*blocked .*parent [0-9a-f]\{12\} failed: " bad_status.txt) -eq 2 ]] ||
  fail "the branches are not reported blocked by their failed parent"
[[ $(grep -c ",blocked," bd/results.csv) -eq 2 ]] || { cat bd/results.csv; fail "results.csv lacks the blocked branches"; }
for id in $(awk '/ blocked / {print $1}' bad_status.txt); do
  [[ ! -s bd/points/$id/attempts.log ]] || fail "blocked branch $id was started"
done
echo "ok: failed stable run, its branches blocked"

# Config errors name the key.
printf '[sweep]\nbase = "base.toml"\nbranch_tokens_per_param = [10]\n[[sweep.point]]\n"optim.schedule" = "cosine"\n' > e1.toml
expect_error "branches without wsd" "key 'sweep.branch_tokens_per_param' needs optim.schedule = \"wsd\" \(got \"cosine\"\)" \
    "$bin" sweep plan e1.toml
printf '[sweep]\nbase = "base.toml"\nbranch_max_steps = [10]\n[[sweep.axis]]\ntokens_per_param = [1]\n' > e2.toml
expect_error "budget axis in a branched sweep" "key 'tokens_per_param' = 1: a branched sweep sets it" "$bin" sweep plan e2.toml
expect_error "stop_step past max_steps" "key 'train.stop_step' = 9 is past train.max_steps = 8" \
    "$bin" train base.toml --set train.stop_step=9
echo "ok: sweep branches"
