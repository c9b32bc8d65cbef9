# Instruction data end to end: synthetic tasks -> prepare --format chat -> a few training steps ->
# eval (masked loss) and eval --tasks (exact match per kind); a single repeated example is learnt
# to 100% exact match; malformed JSONL names the file and the line and leaves no output.
source "$(dirname "$0")/common.sh"
"$bin" tasks 200 --seed 1 --out train.jsonl | grep -q "wrote 200 train examples" || fail "tasks"
"$bin" tasks 200 --seed 1 --out again.jsonl >/dev/null
cmp -s train.jsonl again.jsonl || fail "tasks with one seed differ"
"$bin" tasks 20 --seed 2 --held-out --out held.jsonl >/dev/null
[[ $(wc -l < held.jsonl) -eq 20 ]] || fail "held-out count"
/usr/bin/python3 - <<'PY'
import json
tr = {json.loads(l)["prompt"] for l in open("train.jsonl")}
he = [json.loads(l) for l in open("held.jsonl")]
assert not tr & {e["prompt"] for e in he}, "held-out prompts repeat train prompts"
assert {e["kind"] for e in he} == {"add", "reverse", "lookup", "copy"}
print("ok: tasks deterministic, held-out disjoint")
PY
"$bin" prepare --format chat --input train.jsonl --out tasks.h5 > prep.log
grep -q "in 180 examples" prep.log || { cat prep.log; fail "prepare --format chat"; }
/usr/bin/python3 - <<'PY'
import h5py
with h5py.File("tasks.h5") as f:
    assert f.attrs["format_version"] == 2 and f.attrs["chat_end_id"] == 4
    assert f["train/mask"].shape == f["train/tokens"].shape
    assert f["train/offsets"][-1] == f["train/tokens"].shape[0]
    t = f.attrs["chat_template"]
    assert "### Assistant:" in (t.decode() if isinstance(t, bytes) else t)
print("ok: version 2 file with mask, offsets, template")
PY
train() { "$bin" train "$src/configs/tiny.toml" --set run.out_dir=runs --set run.threads=1 --set train.sample_tokens=0 "$@"; }
train --set data.path=tasks.h5 --set run.name=tasks --set data.seq_len=64 --set train.max_steps=6 > train.log
grep -q "180 train examples packed into" train.log || { cat train.log; fail "no packing line"; }
"$bin" eval runs/tasks | grep -q "val loss:" || fail "eval loss"
"$bin" eval runs/tasks --tasks held.jsonl --max-new 8 > acc.log
for k in add reverse lookup copy all; do grep -Eq "^  $k +[0-9]+ / +[0-9]+" acc.log || { cat acc.log; fail "no $k line"; }; done
grep -Eq "^  all +[0-9]+ / 20 " acc.log || fail "not all 20 held-out examples scored"

# One example repeated: a tiny model learns it, and the evaluator says 100%.
for i in $(seq 40); do echo '{"kind": "greet", "prompt": "hi", "response": "yo"}'; done > one.jsonl
"$bin" prepare --format chat --input one.jsonl --out one.h5 --quiet >/dev/null
train --set data.path=one.h5 --set run.name=one --set train.max_steps=40 --set optim.lr=1e-2 >/dev/null
head -1 one.jsonl > one1.jsonl
"$bin" eval runs/one --tasks one1.jsonl > one.log
grep -Eq "^  greet +1 / 1 +100.0%" one.log || { cat one.log; fail "the repeated example is not learnt"; }
echo "ok: prepare, train, eval --tasks (100% on a learnt example)"

printf '{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": ""}\n' > bad.jsonl
expect_error "empty response" "bad.jsonl:3: .*empty assistant reply" "$bin" prepare --format chat --input bad.jsonl --out bad.h5
printf '{"prompt": "a", "reply": "b"}\n' > key.jsonl
expect_error "unknown key" "key.jsonl:1: .*unknown key \"reply\"" "$bin" prepare --format chat --input key.jsonl --out bad.h5
[[ ! -e bad.h5 && ! -e bad.h5.tmp ]] || fail "prepare left an output for bad JSONL"
expect_error "bad format" "format must be text or chat" "$bin" prepare --format json --input one.jsonl --out x.h5
