# The checkpoint as seen by other tools: the manifest's SHA-256 equal `sha256sum`, `h5dump -H` on
# the index lists every tensor that `peerless inspect` lists, and h5py (Debian's python3-h5py) reads
# a global tensor assembled from both ranks' shards whose values, min, max and mean equal what
# `peerless inspect` reports; ternary code statistics agree too. A damaged checkpoint makes
# inspect report the failing file and exit 1.
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
mpi 2 "$bin" train "$src/configs/tiny.toml" --set data.path=ts.h5 --set run.out_dir=runs --set run.threads=1 \
    --set train.sample_tokens=0 --set train.max_steps=10 --set checkpoint.every_steps=10 --set parallel.zero1=true \
    --set run.name=i > train.log
ck=runs/i/checkpoints/step_10
[[ "$(cat runs/i/checkpoints/latest)" == step_10 ]] || fail "latest does not name step_10"
"$bin" inspect $ck > inspect.txt || { cat inspect.txt; fail "inspect failed"; }
grep -q "all files verified" inspect.txt || fail "inspect did not verify"
grep -q "step 10, tokens" inspect.txt || fail "inspect shows no step"
grep -q "^  \[model\]" inspect.txt || fail "inspect shows no config"
/usr/bin/python3 - $ck <<'PY'
import json, subprocess, sys
ck = sys.argv[1]
for f in json.load(open(f"{ck}/manifest.json"))["files"]:
    out = subprocess.run(["sha256sum", f"{ck}/{f['name']}"], capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == f["sha256"], (f["name"], out, f["sha256"])
print("ok: manifest SHA-256 == sha256sum for every file")
PY
h5dump -H $ck/index.h5 > h5dump.txt
/usr/bin/python3 - $ck "$bin" <<'PY'
import re, subprocess, sys
import h5py, numpy as np
ck = sys.argv[1]
# Every tensor of `peerless inspect` appears in `h5dump -H` (datasets by full path).
listed = [l.split()[0] for l in open("inspect.txt") if l.startswith("  /")]
stack, dumped = [], set()
for line in open("h5dump.txt"):
    s = line.strip()
    m = re.match(r'(\w+)\s*("([^"]*)")?.*\{$', s)
    if m:
        stack.append((m[1], m[3]))
        if m[1] == "DATASET":
            dumped.add("/" + "/".join(n for k, n in stack if k in ("GROUP", "DATASET") and n != "/"))
    elif s == "}":
        stack.pop()
missing = [t for t in listed if t not in dumped]
assert listed and not missing, missing[:5]
print(f"ok: h5dump -H lists all {len(listed)} tensors")

stats = {}
for l in open("inspect.txt"):
    if l.startswith("  /"):
        stats[l.split()[0]] = l
f = h5py.File(f"{ck}/index.h5", "r")
# A tensor assembled from both shards (ZeRO-1 slices cut it).
name = next(t for t in listed if t.startswith("/model/") and
            len({s.file_name for s in f[t].virtual_sources()}) == 2)
x = f[name][...]
dtype = f[name].attrs["dtype"]
assert x.dtype == np.float32 and (dtype.decode() if isinstance(dtype, bytes) else dtype) == "float32"
shape = f[name].attrs["shape"]
shape = tuple(int(v) for v in (shape.decode() if isinstance(shape, bytes) else shape).split(","))
assert x.size == np.prod(shape), (x.shape, shape)
vals = subprocess.run([sys.argv[2], "inspect", ck, "--tensor", name], capture_output=True, text=True, check=True).stdout.split()
vals = np.array([float(v) for v in vals], dtype=np.float32)
assert np.array_equal(vals, x), "h5py and peerless inspect --tensor disagree"
m = re.search(r"min (\S+)\s+max (\S+)\s+mean (\S+)", stats[name])
assert np.float32(m[1]) == x.min() and np.float32(m[2]) == x.max(), (m.groups(), x.min(), x.max())
assert abs(float(m[3]) - x.astype(np.float64).mean()) <= 1e-6 * abs(x).mean(), (m[3], x.mean())
print(f"ok: h5py reads {name} {shape} from 2 shards; values, min, max, mean equal peerless inspect")
# Ternary codes: the fraction of zeros.
cname = next(t for t in listed if t.endswith("/codes"))
packed = f[cname][...]
numel = int(f[cname].attrs["numel"])
codes = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(-1)[:numel]
zeros = float((codes == 0).mean())
m = re.search(r"zeros (\S+)", stats[cname])
assert abs(float(m[1]) - zeros) < 1e-6, (m[1], zeros)
print(f"ok: {cname}: zeros fraction {zeros:.6f} as inspect reports")
PY
cp -r $ck flipped
/usr/bin/python3 -c "
p='flipped/shard_1.h5'; b=bytearray(open(p,'rb').read()); b[len(b)//3]^=1; open(p,'wb').write(b)"
status=0
"$bin" inspect flipped > flipped.txt || status=$?
[[ $status -eq 1 ]] && grep -q "FAILED: checkpoint file flipped/shard_1.h5 fails its SHA-256 check" flipped.txt ||
  { cat flipped.txt; fail "inspect of a damaged checkpoint"; }
echo "ok: inspect names the damaged file and exits 1"
