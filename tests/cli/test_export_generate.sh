# Deployment end to end on small trained models (dense and PEER): export to GGUF (TQ2_0, TQ1_0) and
# the packed profile, generate from each file, and check that greedy text for 200 tokens equals the
# trainer's own model (F32 embedding: the same numbers), that import -> export gives the same bytes,
# that inspect reads every file, and that corrupt files are clear errors.
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
train() {
  "$bin" train "$src/configs/tiny.toml" --set data.path=ts.h5 --set run.out_dir=runs --set run.name="$1" \
    --set model.d_model=128 --set model.intermediate=256 --set train.max_steps=40 --set train.sample_tokens=0 \
    "${@:2}" > "$1.log"
}
train dense
train peer --set model.peer_blocks=1 --set model.peer_n_sub=8 --set model.peer_heads=2 --set model.peer_topk=4 \
  --set model.peer_key_dim=16 --set model.peer_ternary=true
gen() { "$bin" generate "$1" --prompt "ROMEO:" --tokens 200 --temperature 0 --quiet; }
for m in dense peer; do
  "$bin" export runs/$m --out $m.gguf --quiet > /dev/null
  "$bin" export runs/$m --out $m-f32.gguf --embedding f32 --quiet > /dev/null
  "$bin" export runs/$m --out $m-tq1.gguf --ternary tq1_0 --embedding q8_0 --quiet > /dev/null
  "$bin" export runs/$m --out $m-packed.gguf --format packed --embedding f32 --quiet > /dev/null
  "$bin" export runs/$m --out $m.safetensors --format safetensors > /dev/null
  "$bin" inspect $m.safetensors > inspect.txt
  grep -q "peerless.architecture = peerless" inspect.txt || fail "$m: inspect safetensors"
  gen runs/$m > $m-model.txt
  [[ $(wc -c < $m-model.txt) -gt 200 ]] || fail "$m: generate printed too little"
  for f in $m-f32.gguf $m-packed.gguf; do
    gen $f > out.txt
    cmp -s out.txt $m-model.txt || { diff out.txt $m-model.txt | head; fail "$m: greedy text from $f differs from the model's"; }
  done
  for f in $m.gguf $m-tq1.gguf; do
    gen $f > /dev/null || fail "$m: generate from $f"
    "$bin" import $f --out $m-imported.h5 > /dev/null
    "$bin" export $m-imported.h5 --out again.gguf --quiet $( [[ $f == *tq1* ]] && echo --ternary tq1_0 --embedding q8_0 ) \
      --name "$m" > /dev/null
    cmp -s $f again.gguf || fail "$m: import then export of $f does not give the same bytes"
  done
  "$bin" inspect $m-packed.gguf > inspect.txt
  grep -q 'peerless.tensor_data_layout *"peerless-r4-v1"' inspect.txt || fail "$m: inspect packed"
  "$bin" inspect runs/$m/model.h5 > inspect.txt
  grep -q "sha256 verified" inspect.txt || fail "$m: inspect model file"
  echo "ok: $m: gguf, tq1_0, packed; greedy text identical for 200 tokens; import/export fixed point"
done
"$bin" generate dense.gguf --prompt "KING" --tokens 30 --seed 5 --top-k 20 --top-p 0.9 --quiet > s1.txt
"$bin" generate dense.gguf --prompt "KING" --tokens 30 --seed 5 --top-k 20 --top-p 0.9 --quiet > s2.txt
cmp -s s1.txt s2.txt || fail "sampling with one seed is not reproducible"
"$bin" generate dense.gguf --prompt "KING" --tokens 20 2> speed.txt > /dev/null
grep -Eq "prompt: .* tokens/s\); decode: .* tokens/s\)" speed.txt || fail "no prompt/decode speeds"
# Corrupt inputs: a truncated GGUF, a flipped data byte in a model file.
head -c 3000 dense.gguf > cut.gguf
expect_error "truncated gguf" "cut.gguf" "$bin" generate cut.gguf --tokens 5
cp runs/dense/model.h5 bad.h5
/usr/bin/python3 - bad.h5 <<'PY'
import sys, h5py
with h5py.File(sys.argv[1], "r") as f:
    off = f["ternary/blocks/0/mixer/i_proj/weight/codes"].id.get_offset()
with open(sys.argv[1], "r+b") as f:
    f.seek(off + 10); b = f.read(1); f.seek(off + 10); f.write(bytes([b[0] ^ 0x40]))
PY
expect_error "corrupt model file" "is corrupt" "$bin" export bad.h5 --out x.gguf
expect_error "unknown format" "not one of gguf, packed" "$bin" export runs/dense --format onnx --out x
echo "ok: export, import, generate"
