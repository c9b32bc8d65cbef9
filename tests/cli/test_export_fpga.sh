# The FPGA bundle (`export --format fpga`, FORMATS §7, docs/deployment-fpga.md) on small trained
# models (d 128, so every K is a multiple of 128), checked by tests/fpga_check.py (Python + NumPy,
# reading only the bundle): the default tiling (16 x 128, rk, u2), 8 x 256 kr in t5 and s2, partial
# 3 x 100 tiles in u2, and a PEER model (ternary expert table as a stream). A corrupted weight byte
# fails the check (sha256), and so does one whose manifest sha256 was re-sealed (the accumulators
# no longer match), or a re-sealed golden y. An existing non-empty --out and bad tile options are
# clear errors.
source "$(dirname "$0")/common.sh"
py=/usr/bin/python3
[[ -x $py ]] || py=python3
"$py" -c 'import numpy' 2>/dev/null ||
  fail "tests/fpga_check.py needs NumPy: install the Debian package python3-numpy (listed in launch/packages.txt)"
check="$src/tests/fpga_check.py"

"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
train() {
  "$bin" train "$src/configs/tiny.toml" --set data.path=ts.h5 --set run.out_dir=runs --set run.name="$1" \
    --set model.d_model=128 --set model.intermediate=256 --set train.max_steps=20 --set train.sample_tokens=0 \
    --set train.eval_every=0 --set train.final_eval_windows=1 "${@:2}" > "$1.log"
}
train dense
train peer --set model.peer_blocks=1 --set model.peer_n_sub=8 --set model.peer_heads=2 --set model.peer_topk=4 \
  --set model.peer_key_dim=16 --set model.peer_ternary=true

# export_check NAME MODEL [OPTIONS...]: export a bundle and run the independent check on it.
export_check() {
  "$bin" export "$2" --format fpga --out "$1" "${@:3}" > "$1.export.txt" || { cat "$1.export.txt"; fail "$1: export"; }
  "$py" "$check" "$1" > "$1.check.txt" 2>&1 || { cat "$1.check.txt"; fail "$1: fpga_check.py failed"; }
  echo "ok: $1: $(cat "$1.check.txt")"
}
export_check default runs/dense
export_check t5 runs/dense --tile-rows 8 --tile-cols 256 --tile-order kr --code-map t5
export_check s2 runs/dense --tile-rows 8 --tile-cols 256 --tile-order kr --code-map s2
export_check partial runs/dense --tile-rows 3 --tile-cols 100 --tile-order rk --code-map u2
export_check peer runs/peer --tile-order kr --code-map t5
grep -q "13 BitLinears x 10 rows" default.check.txt || fail "default: expected 13 BitLinears of 8 + 2 rows"
[[ ! -e default.tmp ]] || fail "default.tmp left behind"

# The manifest's fields (FORMATS §7), without NumPy.
"$py" - default/manifest.json t5/manifest.json <<'PY'
import json, re, sys
m = json.load(open(sys.argv[1], encoding="utf-8"))
assert list(m) == ["format", "version", "model", "quant", "code_map", "tile", "tensors", "golden"], list(m)
assert m["format"] == "peerless-fpga" and m["version"] == 1
assert m["code_map"] == "u2" and m["tile"] == {"rows": 16, "cols": 128, "order": "rk"}, m["tile"]
assert (m["model"]["arch"], m["model"]["d"], m["model"]["L"], m["model"]["I"]) == ("peerless", 128, 2, 256)
assert m["quant"]["epilogue"] == "y = acc·β/s" and m["quant"]["accumulator"] == "int32"
streams = [t for t in m["tensors"] if t["encoding"] == "stream"]
assert len(streams) == 13 and all(re.fullmatch(r"0x[0-9a-f]{8}", t["beta_bits"]) for t in streams)
assert all(t["file"] == "weights/" + t["name"] + ".bin" for t in streams)
assert all(len(t["shape"]) == 2 and set(t) >= {"name", "shape", "beta", "file", "bytes", "sha256"} for t in streams)
assert not any(t["name"].endswith(".scale") or t["name"] == "mlgru_lb_raw" for t in m["tensors"])
lin = [g for g in m["golden"] if "weight" in g]
assert len(lin) == 13 and all(set(g["files"]) == {"x_tilde", "a", "s", "acc", "y"} for g in lin)
assert lin[0]["files"]["x_tilde"]["file"] == "golden/blk.0/mlgru_i.x_tilde", lin[0]["files"]["x_tilde"]
assert {(g["layer"], g["tensor"]) for g in m["golden"] if "weight" not in g} == \
    {("input", "prompt"), ("blk.0", "block"), ("blk.1", "block"), ("output", "final")}
t5 = json.load(open(sys.argv[2], encoding="utf-8"))
assert t5["code_map"] == "t5" and t5["tile"] == {"rows": 8, "cols": 256, "order": "kr"}
# [512, 128] in 8 x 256 tiles: 64 tiles whose inputs 128..255 are edges, 5 codes a byte
w = next(t for t in t5["tensors"] if t["name"] == "blk.0.ffn_gate_up.weight")
assert w["shape"] == [512, 128] and w["bytes"] == (64 * 8 * 256 + 4) // 5, w
print("ok: manifest fields")
PY

# expect_check_fail NAME PATTERN FILE OFFSET [reseal]: flip a byte of a copy of the default bundle
# (optionally re-sealing its sha256 in the manifest): the check must fail and say PATTERN.
expect_check_fail() {
  rm -rf bad && cp -r default bad
  "$py" - bad "$3" "$4" "${5:-}" <<'PY'
import hashlib, json, sys
root, rel, off, reseal = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "reseal"
data = bytearray(open(f"{root}/{rel}", "rb").read())
data[off] ^= 0x01
open(f"{root}/{rel}", "wb").write(data)
if reseal:
    m = json.load(open(f"{root}/manifest.json", encoding="utf-8"))
    for e in m["tensors"] + [f for g in m["golden"] for f in g["files"].values()]:
        if e["file"] == rel:
            e["sha256"] = hashlib.sha256(data).hexdigest()
    json.dump(m, open(f"{root}/manifest.json", "w", encoding="utf-8"), ensure_ascii=False, indent=1)
PY
  expect_error "$1" "$2" "$py" "$check" bad
}
expect_check_fail "corrupt weight byte" "blk.0.mlgru_i.weight.bin sha256" weights/blk.0.mlgru_i.weight.bin 5
expect_check_fail "corrupt weight byte, re-sealed" "mlgru_i.acc: row 0" weights/blk.0.mlgru_i.weight.bin 5 reseal
expect_check_fail "corrupt golden y, re-sealed" "ffn_down.y: at" golden/blk.1/ffn_down.y 8 reseal
expect_check_fail "corrupt golden a, re-sealed" "ffn_down.a: row 0" golden/blk.1/ffn_down.a 8 reseal
rm -rf bad && cp -r default bad && rm bad/golden/blk.0/mlgru_f.s
expect_error "missing golden file" "mlgru_f.s is missing" "$py" "$check" bad

expect_error "existing bundle" "exists and is not empty" "$bin" export runs/dense --format fpga --out default
expect_error "bad tile options" "tile-rows = \"0\".*" "$bin" export runs/dense --format fpga --out x --tile-rows 0 \
  --code-map q
grep -q 'code-map = "q" is not one of u2, s2, t5' "$work/err.txt" || fail "bad options not all reported"
[[ ! -e x && ! -e x.tmp ]] || fail "a refused export left files behind"
echo "ok: fpga bundle"
