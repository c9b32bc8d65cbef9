# `peerless fit` on a synthetic results table (a known law with 1% noise): the printed table,
# fit.json (version, input sha256, exponent near the truth) and PNG plots; malformed tables and too
# few points give clear errors. `peerless plot` on a tiny real run and on a sweep directory built
# here: PNG files with the PNG signature.
source "$(dirname "$0")/common.sh"
png() { [[ -s $1 ]] || fail "no $1"; [[ $(head -c 8 "$1" | od -An -tx1 | tr -d ' \n') == 89504e470d0a1a0a ]] || fail "$1 is not a PNG"; }

/usr/bin/python3 - <<'PY'
import math, random
random.seed(3)
E, A, B, al, be = 1.8172, 477.8, 2143, 0.3473, 0.3672  # Epoch AI's refit, SWEEPS.md section 4
G, a = (al * A / (be * B)) ** (1 / (al + be)), be / (al + be)
cols = ("id,name,arch,status,attempts,seed,n_params,n_active,flops_per_token,tokens,steps,batch,lr,schedule,"
        "parent_id,flops,budget_C,val_loss,val_tokens,wall_s,tokens_per_s,git_sha,config_sha256").split(",")
with open("results.csv", "w") as f:
    f.write(",".join(cols) + "\n")
    for i in range(5):
        C = 6e18 * (3e21 / 6e18) ** (i / 4)
        for k in range(-3, 4):
            N = G * (C / 6) ** a * math.exp(0.45 * k); D = C / (6 * N)
            L = (E + A * N ** -al + B * D ** -be) * math.exp(0.01 * random.gauss(0, 1))
            status = "diverged" if (i, k) == (2, 0) else "done"
            r = dict(id=f"p{i}{k+3}", name=f"b{i}-s{k+3}", arch="mmf", status=status, attempts=1, seed=1,
                     n_params=1.1 * N, n_active=N, flops_per_token=6 * N, tokens=D, steps=1, batch=1, lr=1e-3,
                     schedule="wsd", parent_id="", flops=6 * N * D, budget_C=C, val_loss=L, val_tokens=1, wall_s=1,
                     tokens_per_s=1, git_sha="x", config_sha256="y")
            f.write(",".join(str(r[c]) for c in cols) + "\n")
PY
"$bin" fit results.csv --bootstrap 40 --seed 2 --target-C 1e23 --out fit > fit.log
grep -q "fit: 34 points (of 35 rows)" fit.log || { cat fit.log; fail "point selection"; }
grep -Eq "^  alpha +0\.[0-9]+" fit.log || fail "no alpha row"
grep -q "N_opt@C=1e+23" fit.log || fail "no --target-C row"
for f in isoflop frontier residuals; do png fit/$f.png; done
/usr/bin/python3 - "$(sha256sum results.csv | cut -c1-64)" <<'PY'
import json, sys
j = json.load(open("fit/fit.json"))
assert j["fitter"].startswith("peerless-fit"), j["fitter"]
assert j["input"]["sha256"] == sys.argv[1], "input sha256"
q = j["approach3"]["quantities"]
assert abs(q["a"]["fit"] - 0.514) < 0.08, q["a"]
assert q["a"]["ci95"][0] < q["a"]["ci95"][1]
assert j["approach3"]["bootstrap"]["replicates"] == 40
assert j["approach2"]["ok"] and abs(j["approach2"]["quantities"]["a"]["fit"] - 0.514) < 0.08
print("ok: fit.json", q["a"]["fit"], j["approach2"]["quantities"]["a"]["fit"])
PY
# Same seed, same numbers.
"$bin" fit results.csv --bootstrap 40 --seed 2 --target-C 1e23 > fit2.log
diff <(grep -v wrote fit.log | sed "/^$/d") <(sed "/^$/d" fit2.log) > /dev/null || fail "same seed, different output"

head -3 results.csv > short.csv && echo "q,q,q" >> short.csv
expect_error "malformed csv" "short.csv:4: 3 fields, the header has 23" "$bin" fit short.csv
sed '3s/,done,/,done,1,/' results.csv > extra.csv
expect_error "extra field" "extra.csv:3: 24 fields" "$bin" fit extra.csv
sed '2s/,done,1,1,[^,]*,/,done,1,1,abc,/' results.csv > nan.csv
expect_error "not a number" "nan.csv:2: column 7 \(n_params\)" "$bin" fit nan.csv --n total
head -5 results.csv > few.csv
expect_error "too few points" "at least 5 finished points" "$bin" fit few.csv
expect_error "bad --n" "n must be active or total" "$bin" fit results.csv --n half

# A tiny real run, then a sweep directory holding it twice.
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet > /dev/null
"$bin" train "$src/configs/tiny.toml" --set data.path=ts.h5 --set run.out_dir=runs --set run.name=a \
  --set train.max_steps=10 > train.log
"$bin" plot runs/a | grep -q "wrote runs/a/plots/loss.png" || fail "plot run"
png runs/a/plots/loss.png
mkdir -p sweep/points/p1 sweep/points/p2
cp runs/a/metrics.jsonl sweep/points/p1/ && cp runs/a/metrics.jsonl sweep/points/p2/
echo '{"name": "mmf-d32"}' > sweep/points/p1/point.json
cp results.csv sweep/results.csv
"$bin" plot sweep --out sweep_plots > plot.log
png sweep_plots/loss_curves.png
png sweep_plots/loss_vs_flops.png
grep -q "mmf-d32" sweep_plots/loss_curves.gp || fail "point name not in the legend"
grep -q "'p2'" sweep_plots/loss_curves.gp || fail "point without point.json not labelled by id"
png sweep_plots/isoflop.png  # the synthetic table has budget_C groups of 7 sizes
# Two architectures: --where fits one of them; --with draws another sweep beside this one.
sed '2,10s/,mmf,/,peer,/' results.csv > two.csv
"$bin" fit two.csv --where arch=mmf --bootstrap 0 > where.log
grep -q "fit: 25 points (of 35 rows)" where.log || { cat where.log; fail "--where arch=mmf selection"; }
expect_error "--where on a missing column" "no column 'nope'" "$bin" fit two.csv --where nope=1
mkdir -p other && cp two.csv other/results.csv
"$bin" plot sweep --with other --out with_plots > with.log
grep -q "'other: peer'" with_plots/loss_vs_flops.gp || { cat with_plots/loss_vs_flops.gp; fail "--with labels"; }
png with_plots/loss_vs_flops.png
mkdir empty
expect_error "not a run or sweep" "neither a run directory" "$bin" plot empty
echo "ok: fit, plot"
