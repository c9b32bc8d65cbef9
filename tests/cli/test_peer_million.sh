# N = 1024^2 experts (SPEC §3's default n = 1024) train under `mpirun -np 2`: one PEER block with
# d = 16 (table 1,048,576 x 32 fp32 = 128 MiB), everything else tiny, 3 steps with dense AdamW and
# 3 with lazy Adam (table lr scale 2), the table sharded by rows over the 2 ranks (the default,
# parallel.expert_parallel = 0 = all ranks: 64 MiB of rows each), and once replicated
# (expert_parallel = 1). Losses must be finite, and each rank's measured peak RSS (VmHWM, printed by
# the trainer after the steps) must lie between the printed per-rank accounting and that plus
# the process's own footprint before the model (printed: libraries, MPI, HDF5, OpenBLAS, and in a
# CUDA build the CUDA libraries, ~170 MiB) plus 64 MiB of allocator slack, and
# above the PEER table part (weights + gradients + AdamW: 256 MiB sharded, 512 MiB replicated).
# Budget: well under 1 GiB per rank, a few seconds per run on 2 cores.
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
common=(--set data.path=ts.h5 --set run.out_dir=runs --set run.threads=1 --set train.sample_tokens=0
        --set train.micro_batch=2 --set train.max_steps=3 --set train.log_every=1 --set train.eval_every=0
        --set train.final_eval_windows=2 --set model.d_model=16 --set model.n_layers=1 --set model.intermediate=32
        --set model.peer_blocks=0 --set model.peer_n_sub=1024 --set model.peer_heads=1 --set model.peer_topk=4
        --set model.peer_key_dim=8)
mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=dense > dense.log
mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=lazy --set optim.table_optimizer=lazy_adam \
    --set optim.table_lr_scale=2 > lazy.log
mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set run.name=replicated --set parallel.expert_parallel=1 \
    > replicated.log
grep -q "sharded by rows over 2 ranks: this rank holds rows \[0, 524288)" dense.log || { cat dense.log; fail "not sharded"; }
grep -q "(replicated)" replicated.log || { cat replicated.log; fail "not replicated"; }
for name in dense lazy replicated; do
  grep -q "N = 1,048,576 experts" $name.log || { cat $name.log; fail "$name: no PEER accounting for N = 1024^2"; }
  grep -q "peak memory per rank (VmHWM): rank 0 .*, rank 1 " $name.log || { cat $name.log; fail "$name: no peak memory line"; }
done
grep -q "optimizer lazy_adam, table lr scale 2" lazy.log || { cat lazy.log; fail "lazy: optimizer not reported"; }
/usr/bin/python3 - <<'PY'
import json, math, re
units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
for name in ["dense", "lazy", "replicated"]:
    log = open(f"{name}.log").read()
    rows = [json.loads(l) for l in open(f"runs/{name}/metrics.jsonl")]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows), (name, rows)
    v, u = re.search(r"total ≈ ([\d.]+) (\w+)", log).groups()
    total = float(v) * units[u]
    table = int(re.search(r"PEER tables per rank \(weights \+ gradients \+ AdamW moments\): .* = (\d+) bytes", log).group(1))
    n_rows = 1024**2 // (1 if name == "replicated" else 2)
    assert table == 4 * 4 * n_rows * 32, (name, table)
    peaks = [int(b) for b in re.findall(r"rank \d+ [\d.]+ \w+ = (\d+) bytes", log)]
    assert len(peaks) == 2, peaks
    base = int(re.search(r"process before the model's buffers \(VmRSS\): .* = (\d+) bytes", log).group(1))
    margin = base + 64 * 2**20
    for r, p in enumerate(peaks):
        print(f"{name}: rank {r} peak {p / 2**20:.1f} MiB, accounted {total / 2**20:.1f} MiB "
              f"(tables {table / 2**20:.0f} MiB), over by {(p - total) / 2**20:.1f} MiB (allowed 0..{margin / 2**20:.0f})")
        assert table < p and total <= p <= total + margin, (name, r, p, total)
print(f"ok: losses finite, peak RSS within the accounting + the process base ({base / 2**20:.0f} MiB) + 64 MiB "
      "on both ranks, sharded and replicated")
PY
echo "ok: a PEER layer with 1024^2 experts trains under mpirun -np 2 (dense AdamW and lazy Adam)"
