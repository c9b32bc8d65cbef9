# μP coordinate check (../shared/SWEEPS.md §3, `peerless coordcheck`): widths 128, 256, 512 (base
# width 32, so m = 4..16), 3 steps at 10x the learning rate on one fixed batch of 8 tokens, 2 seeds,
# full-precision projections (model.quant = none; ternary μP is unverified, see the README). mup:
# at the last step every module output's log mean|x| has a slope within ±0.1 against log width;
# sp (the control): the logits fail (they grow with width), and so do the block outputs. Also the
# CSV columns, and the config errors of mup with kinds or devices it does not cover.
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
set_args=(--set data.path=ts.h5 --set run.threads=1 --set model.quant=none --set model.mup_base_width=32
          --set train.micro_batch=1 --set data.seq_len=8)
"$bin" coordcheck "$src/configs/tiny.toml" "${set_args[@]}" --widths 128,256,512 --steps 3 --seeds 2 --out cc > cc.log \
  || { cat cc.log; fail "coordcheck failed"; }
/usr/bin/python3 - <<'PY' || { cat cc.log; fail "coordcheck slopes"; }
import csv, sys
rows = list(csv.DictReader(open("cc/coordcheck.csv")))
assert list(rows[0]) == ["param", "width", "seed", "step", "tensor", "mean_abs"], list(rows[0])
tensors = {r["tensor"] for r in rows}
for t in ["embedding", "blocks/0/mlgru", "blocks/0/glu", "blocks/1/mlgru", "blocks/1/glu", "final_norm", "logits", "loss"]:
    assert t in tensors, (t, tensors)
assert {(r["param"], r["width"], r["seed"]) for r in rows} == {(p, w, s) for p in ("sp", "mup") for w in ("128", "256", "512") for s in ("0", "1")}
slopes = {(r["param"], r["tensor"], int(r["step"])): float(r["slope"]) for r in csv.DictReader(open("cc/slopes.csv"))}
bad = {k: v for k, v in slopes.items() if k[0] == "mup" and k[2] == 3 and abs(v) > 0.1}
assert not bad, f"mup slopes outside ±0.1 at the last step: {bad}"
assert slopes[("sp", "logits", 3)] > 0.2, slopes[("sp", "logits", 3)]
assert all(slopes[("sp", f"blocks/{l}/{k}", s)] > 0.3 for l in (0, 1) for k in ("mlgru", "glu") for s in (1, 2, 3))
flips = list(csv.DictReader(open("cc/flips.csv")))
assert not flips, "quant none has no ternary codes to flip"
print("ok: mup slopes within ±0.1 at step 3; sp logits slope", slopes[("sp", "logits", 3)])
PY
grep -q "mup: .*at the last step 7 of 7: PASS" cc.log || { cat cc.log; fail "no mup PASS line"; }
for f in cc/coordcheck_sp.png cc/coordcheck_mup.png; do
  [[ $(head -c 8 "$f" | od -An -tx1 | tr -d ' ') == 89504e470d0a1a0a ]] || fail "$f is not a PNG"
done
t=("$bin" train "$src/configs/tiny.toml" --set data.path=ts.h5 --set model.param=mup --dry-run)
expect_error "mup with attention" "key 'model.param' = \"mup\" with model.token_mixer = \"attention\"" \
    "${t[@]}" --set model.token_mixer=attention
expect_error "mup with a tied head" "model.head = \"tied\"" "${t[@]}" --set model.head=tied
expect_error "mup on cuda" "key 'model.param' = \"mup\" with run.device = \"cuda\"" "${t[@]}" --set run.device=cuda
echo "ok: coordcheck (mup passes, sp fails) and mup's config errors"
