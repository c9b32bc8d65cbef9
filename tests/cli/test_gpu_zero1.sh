# ZeRO-1 and the device bucket exchange on GPUs (run.device = cuda; labelled gpu, it needs a GPU;
# model/data_parallel_cuda.h). The same global batch of 16 sequences trained 20 steps on 1 rank
# (4 accumulation steps), 2 ranks (2) and 4 ranks (1), ZeRO-1 off and on, with the MPI backend (all
# ranks share one GPU):
#  - deterministic mode (exact fixed-point gradient sums; ZeRO-1 gathers the owners' fp32 values and
#    every rank refreshes β and codes from whole tensors in the fused op's order): the logged losses,
#    gradient norms and validation losses, and the saved model's tensors, identical in all six runs;
#  - the fast path on 2 ranks: parallel.overlap = true (buckets reduced as the backward finalises them)
#    equals overlap = false (after the backward) bit for bit, ZeRO-1 off and on (the same collectives
#    on the same bytes); ZeRO-1 on vs off within 3e-4 relative (β from the owners' partial sums: another
#    float64 order, see test_gpu_data_parallel.sh for why the fast path is compared with a tolerance);
#  - ZeRO-1 keeps AdamW moments for the owned slices only: the startup line's moment bytes shrink
#    with the ranks, and the exchange timing line is printed.
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
common=(--set data.path=ts.h5 --set run.out_dir=runs --set run.device=cuda --set train.sample_tokens=0
        --set train.micro_batch=4 --set train.log_every=1 --set train.eval_every=10 --set train.eval_windows=8
        --set train.final_eval_windows=16 --set model.d_model=64 --set model.intermediate=128
        --set parallel.bucket_mb=1)
run() {  # NAME RANKS EXTRA...: 16 sequences per step over RANKS ranks
  local name="$1" ranks="$2"
  shift 2
  local accum=$((4 / ranks))
  if [[ $ranks == 1 ]]; then
    "$bin" train "$src/configs/tiny.toml" "${common[@]}" "$@" --set run.name=$name --set train.accum_steps=$accum \
        > $name.log
  else
    mpi $ranks "$bin" train "$src/configs/tiny.toml" "${common[@]}" "$@" --set parallel.backend=mpi \
        --set run.name=$name --set train.accum_steps=$accum > $name.log
  fi
}
for ranks in 1 2 4; do
  run d${ranks}z0 $ranks --set parallel.deterministic=on --set parallel.zero1=false
  run d${ranks}z1 $ranks --set parallel.deterministic=on --set parallel.zero1=true --set checkpoint.every_steps=10
done
# The 2-rank ZeRO-1 checkpoint of step 10 (moment shards downloaded from the GPUs) continues on 4 ranks
# with ZeRO-1 and on 1 rank without, each uploading its own part of the moments.
ck=runs/d2z1/checkpoints/step_10
run r4z1 4 --set parallel.deterministic=on --set parallel.zero1=true --resume $ck
run r1z0 1 --set parallel.deterministic=on --set parallel.zero1=false --resume $ck
for z in 0 1; do
  zero1=$([[ $z == 1 ]] && echo true || echo false)
  run f2z${z}o1 2 --set parallel.deterministic=off --set parallel.zero1=$zero1 --set parallel.overlap=true
  run f2z${z}o0 2 --set parallel.deterministic=off --set parallel.zero1=$zero1 --set parallel.overlap=false
done
grep -q "ZeRO-1 slices of 4 ranks" d4z1.log || { cat d4z1.log; fail "4-rank ZeRO-1 run did not report its slices"; }
grep -q "gradient exchange (parallel.overlap = true): exposed" f2z1o1.log || { cat f2z1o1.log; fail "no exchange timing"; }
grep -q "gradient buckets: reduced as they complete" f2z0o1.log || { cat f2z0o1.log; fail "no bucket line"; }
/usr/bin/python3 - <<'PY'
from run_compare import rows, rel, params_sha, same_model
import json
import re
import shutil
import subprocess
def identical(one, two, what):
    base, other = rows(one), rows(two)
    assert len(base) == 21 and len(other) == 21, (two, len(base), len(other))
    for key in ("loss", "grad_norm", "val_loss"):
        a = [r.get(key) for r in base]
        b = [r.get(key) for r in other]
        assert a == b, (two, key, next((i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y))
    same, how = same_model(one, two)
    assert same, (two, "model files differ", how)
    print(f"{two}: {what}: 20 losses, gradient norms, 2 validations and the model file ({how}) identical to {one}")
base = rows("d1z0")
assert base[-1]["loss"] < base[0]["loss"] - 0.3, "d1z0 did not learn"
for name in ("d1z1", "d2z0", "d2z1", "d4z0", "d4z1"):
    identical("d1z0", name, "deterministic")
for z in (0, 1):
    identical(f"f2z{z}o0", f"f2z{z}o1", "fast path, overlap on vs off")
after = base[10:]  # steps 11-20 and the final evaluation
for name in ("r4z1", "r1z0"):
    resumed = rows(name)
    assert len(resumed) == len(after) and resumed[0]["step"] == 11, (name, len(resumed), resumed[0].get("step"))
    for r, want in zip(resumed, after):
        for key in ("step", "loss", "grad_norm", "val_loss"):
            assert r.get(key) == want.get(key), (name, r["step"], key, r.get(key), want.get(key))
    same, how = same_model("d1z0", name)
    assert same, (name, "model files differ", how)
    print(f"{name}: resumed from the 2-rank ZeRO-1 checkpoint of step 10: steps 11-20 and the model file ({how}) "
          f"identical to d1z0")
a, b = rows("f2z0o1"), rows("f2z1o1")
worst = max(rel(x["loss"], y["loss"]) for x, y in zip(a, b))
print(f"f2z1o1 (ZeRO-1, fast path) vs f2z0o1: max relative loss difference {worst:.2e}")
assert worst < 3e-4, worst
# The AdamW moments on the GPU: whole without ZeRO-1, about 1/ranks of it with.
units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
def moments(name):
    m = re.search(r"AdamW moments: ([0-9.]+) (B|KiB|MiB|GiB)", open(f"{name}.log").read())
    assert m, (name, "no moments in the device line")
    return float(m.group(1)) * units[m.group(2)]
whole, half, quarter = moments("d1z0"), moments("d2z1"), moments("d4z1")
print(f"AdamW moments per GPU: {whole:.0f} B (whole), {half:.0f} B (ZeRO-1, 2 ranks), {quarter:.0f} B (4 ranks)")
assert moments("d2z0") == whole and half < 0.6 * whole and quarter < 0.35 * whole, (whole, half, quarter)
PY
grep -h "gradient exchange" f2z0o1.log f2z0o0.log f2z1o1.log f2z1o0.log
# With two GPUs or more: the NCCL path (one GPU per rank, reductions on NCCL's stream during the
# backward): deterministic runs identical to 1 rank, the fast path within the same tolerance.
gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c "^GPU" || true)
if [[ ${gpus:-0} -ge 2 ]]; then
  nccl() {  # NAME EXTRA...
    local name="$1"
    shift
    mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" "$@" --set parallel.backend=nccl \
        --set run.name=$name --set train.accum_steps=2 > $name.log
  }
  nccl n2z1 --set parallel.deterministic=on --set parallel.zero1=true
  for o in true false; do
    nccl n2z0$o --set parallel.deterministic=off --set parallel.zero1=false --set parallel.overlap=$o
    nccl n2z1$o --set parallel.deterministic=off --set parallel.zero1=true --set parallel.overlap=$o
  done
  grep -q "during the backward (NCCL stream)" n2z0true.log || { cat n2z0true.log; fail "NCCL run did not overlap"; }
  /usr/bin/python3 - <<'PY'
from run_compare import rows, rel, params_sha, same_model
import json
a, b = rows("d1z0"), rows("n2z1")
for key in ("loss", "grad_norm", "val_loss"):
    assert [r.get(key) for r in a] == [r.get(key) for r in b], ("n2z1", key)
base = rows("n2z0false")
for name in ("n2z0true", "n2z1true", "n2z1false"):
    worst = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(base, rows(name)))
    print(f"NCCL {name} vs n2z0false: max relative loss difference {worst:.2e}")
    assert worst < 3e-4, (name, worst)
print("NCCL: deterministic ZeRO-1 on 2 GPUs identical to 1 rank")
PY
  grep -h "gradient exchange" n2z0true.log n2z0false.log n2z1true.log n2z1false.log
else
  echo "note: fewer than 2 GPUs: the NCCL runs (one GPU per rank) are left out"
fi
echo "ok: GPU ZeRO-1 and bucket exchange: deterministic runs identical over 1, 2, 4 ranks, ZeRO-1 on and off"
