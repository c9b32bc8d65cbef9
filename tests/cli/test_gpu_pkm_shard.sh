# The PKM value table sharded by rows on GPUs (run.device = cuda; labelled gpu, it needs a GPU;
# model/modules/pkm_cuda.cu runs ShardedPkmValuesCuda, model/pkm_values_parallel.h): a tiny PKM model
# (d 64, 2 blocks, channel mixer pkm: N = 16² value rows, 2 heads, k 4) trained 20 steps on the same
# global batch of 16 sequences (micro-batches of 4: 1 rank x 4 accumulation steps, 2 ranks x 2, 4 ranks
# x 1), all ranks on one GPU through the MPI backend, parallel.deterministic = off (deterministic mode
# with a sharded table is a config error on cuda, checked below):
#   b1      1 rank, the whole table (pkm_values_*_cuda)
#   s2, s4  2 and 4 ranks, parallel.expert_parallel = 2 and 4 (each rank holds 1/2, 1/4 of the rows)
#   r2      as s2 with the exchange in rounds of 16 tokens (parallel.peer_round_tokens; s2 runs one
#           round): step 1's loss is s2's bit for bit (a token's entries never span rounds, so every
#           partial row and every combine is the same floats), and the device figure is smaller
# Tolerance, and why: every micro-batch holds the same sequences in every run, so step 1 is a forward
# of equal parameters on equal tokens where only the value bag's output differs. A token's bag is not
# the same bits as on one rank: each owner sums its own entries in entry order (one fmaf chain) and
# the sender adds the owners' partial rows in owner order, where one rank runs a single chain over
# all h·k entries; the difference is a few ulps per element (~1e-7 relative), which reaches the loss
# as ~1e-7, at most ~1e-6: step 1 within 1e-5 relative, PEER's bound (test_gpu_peer_shard.sh), not the
# 1e-6 of MoE, whose sharded outputs are the unsharded bits. From step 1 on the gradients differ in
# float order too (the value rows' gradients summed over senders on the owner, the dense parameters
# through the data-parallel reduction instead of accumulation), AdamW turns differences of near-zero
# gradient elements into O(lr) weight differences, a weight crossing a ternary threshold moves a code
# and a moved query may flip a top-k choice: the trajectories separate slowly, bounded as PEER's:
# every step within 2e-2 relative, the mean over the 20 steps within 5e-3, every run learning (final
# loss at least 0.3 nat below the first). The measured figures are printed.
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
common=(--set data.path=ts.h5 --set run.out_dir=runs --set run.device=cuda --set train.sample_tokens=0
        --set train.micro_batch=4 --set train.log_every=1 --set train.eval_every=0 --set train.final_eval_windows=8
        --set train.max_steps=20 --set model.d_model=64 --set model.n_layers=2 --set model.intermediate=128
        --set model.channel_mixer=pkm --set model.pkm_n_sub=16 --set model.pkm_heads=2 --set model.pkm_topk=4
        --set model.pkm_key_dim=16 --set parallel.deterministic=off)
run() {  # NAME RANKS EXTRA...: 16 sequences per step over RANKS ranks, the table in RANKS shards
  local name="$1" ranks="$2"
  shift 2
  local accum=$((4 / ranks))
  if [[ $ranks == 1 ]]; then
    "$bin" train "$src/configs/tiny.toml" "${common[@]}" "$@" --set run.name=$name --set train.accum_steps=$accum \
        > $name.log || { tail -40 $name.log; fail "$name: exited non-zero"; }
  else
    mpi $ranks "$bin" train "$src/configs/tiny.toml" "${common[@]}" "$@" --set parallel.backend=mpi \
        --set parallel.expert_parallel=$ranks --set run.name=$name --set train.accum_steps=$accum > $name.log ||
        { tail -40 $name.log; fail "$name: exited non-zero"; }
  fi
}
run b1 1
run s2 2
run s4 4
run r2 2 --set parallel.peer_round_tokens=16
for name in s2 s4 r2; do  # the measured exchange: bytes went through the expert group's all-to-alls
  grep -Eq "expert exchange [1-9]" $name.log || { cat $name.log; fail "$name: the value table is not sharded"; }
done
grep -q "ep 0/4" s4.log || { cat s4.log; fail "s4: not 4 expert shards"; }
/usr/bin/python3 - <<'PY'
from run_compare import track, train_steps
track([("b1", "s2"), ("b1", "s4"), ("b1", "r2")], 1e-5, "step 1: the bag's partials added in owner order, nothing else differs")
assert train_steps("r2")[0]["loss"] == train_steps("s2")[0]["loss"], ("rounds changed step 1", train_steps("r2")[0], train_steps("s2")[0])
PY
device_bytes() { sed -n 's/^device: cuda, .* = \([0-9]*\) bytes allocated on the GPU.*/\1/p' "$1" | head -1; }
[[ -n $(device_bytes s2.log) && $(device_bytes r2.log) -lt $(device_bytes s2.log) ]] ||
    fail "rounds did not shrink the device figure ($(device_bytes r2.log) vs $(device_bytes s2.log))"
# Deterministic mode needs the CPU's exact sums: a config error naming the key on cuda.
expect_error "deterministic sharded pkm on cuda" "parallel.deterministic" \
    mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set parallel.backend=mpi \
    --set parallel.expert_parallel=2 --set parallel.deterministic=on --set run.name=det --set train.max_steps=1
echo "ok: sharded PKM value table on GPUs: 2 and 4 shards track 1 rank within the stated tolerances"
