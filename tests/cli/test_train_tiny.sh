# End to end on a tiny model: prepare, train (metrics keys, validation, model, samples), eval,
# sample, and bit-identical losses when the same config runs twice.
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
run() { "$bin" train "$src/configs/tiny.toml" --set data.path=ts.h5 --set run.out_dir=runs --set run.name="$1" "${@:2}"; }
run a > a.log
run b > b.log
m=runs/a/metrics.jsonl
[[ -s $m ]] || fail "no metrics"
/usr/bin/python3 - "$m" runs/b/metrics.jsonl <<'PY'
import json, math, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
base = {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"}
for r in a:
    keys = set(r)
    assert keys in (base, base | {"val_loss"}), keys
    assert all(math.isfinite(r[k]) for k in keys), r
assert any("val_loss" in r for r in a), "no validation loss"
assert a[0]["loss"] > a[-2]["loss"], ("loss did not fall", a[0]["loss"], a[-2]["loss"])
assert [r["loss"] for r in a] == [r["loss"] for r in b], "same config, different losses"
assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]
print("ok: metrics keys, finite, falling, deterministic;", len(a), "lines")
PY
[[ -s runs/a/model.h5 && -s runs/a/samples.txt && -s runs/a/config.toml ]] || fail "run directory incomplete"
grep -q "validation loss:" a.log || fail "no final validation loss printed"
"$bin" eval runs/a --windows 4 | grep -q "val loss:" || fail "eval"
"$bin" sample runs/a --prompt "KING" --tokens 20 --seed 3 > s1.txt
"$bin" sample runs/a --prompt "KING" --tokens 20 --seed 3 > s2.txt
cmp -s s1.txt s2.txt || fail "sampling with one seed is not reproducible"
grep -q "^KING" s1.txt || fail "sample does not start with the prompt"
run a > /dev/null 2> again.err && fail "re-using a run name without --overwrite succeeded"
grep -q "already holds a run" again.err || fail "no clear message for an existing run directory"
echo "ok: train, eval, sample"
