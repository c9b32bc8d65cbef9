# `peerless sweep` under mpirun -np 2 with one rank per point (docs/sweeps.md): a 6-point sweep killed
# (SIGKILL of the whole job) once one point is DONE and the long one has a checkpoint, then rerun:
# the interrupted point resumes from its checkpoint, DONE points are not rerun, no point runs twice
# to completion, results.csv has 6 done rows in the documented columns. Then a point whose config
# fails: FAILED.1, FAILED.2, reported by status and results with its error; and `sweep plan`/errors.
source "$(dirname "$0")/common.sh"
command -v mpirun >/dev/null || fail "mpirun is missing (the sweep test runs under mpirun -np 2)"
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
micro_batch = 4
max_steps = 8
log_every = 1
eval_every = 0
final_eval_windows = 4
sample_tokens = 0
[optim]
lr = 3e-3
warmup_steps = 2
[checkpoint]
every_steps = 4
keep = 2
TOML
# Five short points of several sizes and token budgets (so that the fit has N and D to fit) and one long one (the costliest, so claimed first): the kill lands inside it.
cat > sweep.toml <<'TOML'
[sweep]
name = "crash"
base = "base.toml"
ranks_per_point = 1
stale_after_s = 600
[[sweep.point]]
"train.max_steps" = 400
"optim.lr" = 1e-3
[[sweep.point]]
"model.d_model" = 16
"train.max_steps" = 8
[[sweep.point]]
"model.d_model" = 24
"train.max_steps" = 12
[[sweep.point]]
"model.d_model" = 32
"train.max_steps" = 16
[[sweep.point]]
"model.d_model" = 40
"train.max_steps" = 8
[[sweep.point]]
"model.d_model" = 48
"train.max_steps" = 12
TOML
"$bin" sweep plan sweep.toml > plan.txt
cat plan.txt
[[ $(grep -c '^[0-9a-f]\{12\} ' plan.txt) -eq 6 ]] || fail "plan does not list 6 points"
long=$(awk '/lr1e-3-steps400/ {print $1}' plan.txt)
[[ -n $long ]] || fail "no long point in the plan"

setsid mpirun --oversubscribe -np 2 "$bin" sweep run sweep.toml --dir sd > run1.log 2>&1 &
job=$!
for i in $(seq 1 600); do  # up to 60 s: one DONE point and a checkpoint of the long one
  done_any=$( (ls sd/points/*/DONE 2>/dev/null || true) | wc -l)
  ckpt=$( (ls -d sd/points/$long/checkpoints/step_*/COMPLETE 2>/dev/null || true) | wc -l)
  [[ $done_any -ge 1 && $ckpt -ge 1 ]] && break
  sleep 0.1
done
[[ $done_any -ge 1 && $ckpt -ge 1 ]] || { cat run1.log; fail "no DONE point and checkpoint within 60 s"; }
# mpirun puts each rank in its own process group, all in the session setsid made: kill the session.
kill -9 $(ps -o pid= -s $job) 2>/dev/null || true
wait $job 2>/dev/null || true
for i in $(seq 1 50); do [[ -z $(ps -o pid= -s $job) ]] && break; sleep 0.1; done
[[ -f sd/points/$long/DONE ]] && fail "the long point finished before the kill (make it longer)"
[[ -f sd/points/$long/claim ]] || fail "the killed point left no claim"
for d in sd/points/*/DONE; do stat -c '%n %Y.%y' "$d"; done | sort > done_before.txt
"$bin" sweep status sd > status1.txt
cat status1.txt
grep -q "$long .* resumable" status1.txt || fail "status does not show the killed point as resumable (dead claim)"

mpirun --oversubscribe -np 2 "$bin" sweep run sweep.toml --dir sd > run2.log 2>&1 || { cat run2.log; fail "the rerun failed"; }
grep -q "resumed from sd/points/$long/checkpoints/step_[0-9]*: step [1-9]" sd/points/$long/train.log ||
  { cat sd/points/$long/train.log | tail; fail "the long point did not resume from its checkpoint"; }
/usr/bin/python3 - sd "$long" <<'PY'
import csv, json, os, sys
d, long = sys.argv[1], sys.argv[2]
done_before = {l.split("/")[2] for l in open("done_before.txt") if l.strip()}
cols = ("id,name,arch,status,attempts,seed,n_params,n_active,flops_per_token,tokens,steps,batch,lr,schedule,"
        "parent_id,flops,budget_C,val_loss,val_tokens,wall_s,tokens_per_s,git_sha,config_sha256").split(",")
rows = list(csv.DictReader(open(f"{d}/results.csv")))
assert list(rows[0].keys()) == cols, list(rows[0].keys())
assert len(rows) == 6 and all(r["status"] == "done" for r in rows), [(r["name"], r["status"]) for r in rows]
for r in rows:
    assert float(r["val_loss"]) > 0 and int(r["val_tokens"]) > 0, r
    assert float(r["flops"]) == float(r["flops_per_token"]) * int(r["tokens"]), r
    starts = open(f"{d}/points/{r['id']}/attempts.log").read().split("\n")
    starts = [s for s in starts if s]
    # DONE before the kill: never started again; the long point: started again once (resumed);
    # others the kill caught: at most once more.
    if r["id"] in done_before: assert len(starts) == 1, (r["name"], starts)
    elif r["id"] == long: assert len(starts) == 2, (r["name"], starts)
    else: assert len(starts) <= 2, (r["name"], starts)
    assert int(r["attempts"]) == len(starts), r
    steps = [json.loads(l)["step"] for l in open(f"{d}/points/{r['id']}/metrics.jsonl")]
    assert steps == sorted(steps) and steps[-1] == int(r["steps"]) and steps[-2] == steps[-1], (r["name"], steps[-5:])
    assert len(steps) == int(r["steps"]) + 1, (r["name"], len(steps))  # each step once, then the final eval
assert len(open(f"{d}/results.jsonl").read().splitlines()) == 6
print("ok: 6 rows done,", len(done_before), "DONE before the kill started once, the killed point twice; metrics continuous")
PY
for d in sd/points/*/DONE; do stat -c '%n %Y.%y' "$d"; done | sort > done_after.txt
grep -v "$long" done_after.txt > done_after_others.txt || true
comm -23 done_before.txt done_after_others.txt | grep . && fail "a DONE point was rewritten by the rerun"
echo "ok: rerun resumed $long from its checkpoint and skipped the DONE points"

# The sweep's results feed the fit and the plots (issue 18: "results.csv complete; fit and plots produced").
"$bin" fit sd/results.csv --bootstrap 20 --out fit > fit.txt 2>&1 || { cat fit.txt; fail "fit of the sweep's results failed"; }
grep -q '"alpha"' fit/fit.json || fail "fit.json has no alpha"
"$bin" plot sd --out plots > plot.txt 2>&1 || { cat plot.txt; fail "plot of the sweep failed"; }
for f in fit/frontier.png plots/loss_curves.png plots/loss_vs_flops.png; do
  [[ $(head -c 8 "$f" | od -An -tx1 | tr -d ' ') == 89504e470d0a1a0a ]] || fail "$f is not a PNG"
done
echo "ok: fit and plots of the sweep"

# A point that fails at run time (its data file does not exist): FAILED.1, FAILED.2, then reported.
cat > bad.toml <<'TOML'
[sweep]
name = "bad"
base = "base.toml"
max_failures = 2
[[sweep.point]]
"optim.lr" = 1e-3
[[sweep.point]]
"optim.lr" = 2e-3
"model.vocab_size" = 256
"data.path" = "missing.h5"
TOML
mpirun --oversubscribe -np 2 "$bin" sweep run bad.toml --dir bd > bad.log 2>&1 || { cat bad.log; fail "a failing point failed the sweep"; }
bad=$(basename "$(dirname "$(ls bd/points/*/FAILED.1 | head -1)")")
[[ -n $bad && -f bd/points/$bad/FAILED.2 && ! -f bd/points/$bad/FAILED.3 ]] || fail "expected FAILED.1 and FAILED.2 only"
"$bin" sweep status bd > status2.txt
cat status2.txt
grep -q "$bad .*failed 2" status2.txt || fail "status does not report the failed point"
grep -q "done 1" status2.txt || fail "status does not count the done point"
grep -q "^$bad,.*,failed 2,2," bd/results.csv || { cat bd/results.csv; fail "results.csv lacks the failed point"; }
grep -q "\"error\": \".*" bd/results.jsonl || fail "results.jsonl lacks the error"
echo "ok: failing point retried, FAILED.1/FAILED.2, reported"

# Config errors name the key.
printf '[sweep]\nbase = "base.toml"\n[[sweep.axis]]\n"model.d_modle" = [32]\n' > e1.toml
expect_error "unknown key in an axis" "unknown key 'model.d_modle'" "$bin" sweep plan e1.toml
printf '[sweep]\nbase = "base.toml"\n[[sweep.axis]]\n"model.d_model" = [32, 64]\n"model.n_layers" = [1]\n' > e2.toml
expect_error "uneven axis" "'model.n_layers' has 1 values but 'model.d_model' has 2" "$bin" sweep plan e2.toml
printf '[sweep]\nbase = "base.toml"\nranks = 2\n' > e3.toml
expect_error "unknown sweep key" "unknown key 'sweep.ranks'" "$bin" sweep plan e3.toml
echo "ok: sweep"
