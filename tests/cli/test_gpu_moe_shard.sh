# Sharded MoE and σ-MoE experts on GPUs (run.device = cuda; labelled gpu, it needs a GPU;
# model/modules/moe_cuda.cu): a tiny model (d 64, 2 blocks, E 4 experts, k 2) trained 20 steps on
# the same global batch of 16 sequences (micro-batches of 4: 1 rank x 4 accumulation steps, 2 ranks
# x 2, 4 ranks x 1), all ranks on one GPU through the MPI backend, parallel.deterministic = off
# (deterministic mode with sharded experts is a config error on cuda, checked below):
#   m1 / m2 / m4   moe (top-k softmax, SwiGLU experts) on 1 rank, 2 shards, 4 shards (one expert a rank)
#   c1 / c2        moe with model.moe_capacity_factor = 1 (overflow dropped per micro-batch, as on 1 rank)
#   s1 / s2 / s4   sigma_moe (ReLU experts, sigmoid gates, expert dropout 0.1)
# Tolerance, and why: every micro-batch holds the same sequences in every run, so step 1 is a forward
# of equal parameters on equal tokens, and a sharded expert's product runs over exactly the rows (in
# the same order) that the micro-batch gives it on one rank, through the same kernel: every token's
# output, hence every micro-batch's loss, is the same bits. Only the step's mean over micro-batches
# adds them in another order (accumulation steps vs ranks): step 1 within 1e-6 relative. From step 1
# on the gradients differ in float order (the owner accumulates its experts' gradients one source rank
# at a time, the dense parameters go through the data-parallel reduction instead of accumulation),
# AdamW turns differences of near-zero gradient elements into O(lr) weight differences and a weight
# crossing a ternary threshold moves a code (and may flip a top-k choice): the trajectories separate
# slowly, bounded as tests/cli/test_gpu_peer_shard.sh bounds PEER's: every step within 2e-2 relative,
# the mean over the 20 steps within 5e-3, every run learning (final loss at least 0.3 nat below the first).
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
common=(--set data.path=ts.h5 --set run.out_dir=runs --set run.device=cuda --set train.sample_tokens=0
        --set train.micro_batch=4 --set train.log_every=1 --set train.eval_every=0 --set train.final_eval_windows=8
        --set train.max_steps=20 --set model.d_model=64 --set model.n_layers=2 --set model.intermediate=128
        --set model.channel_mixer=moe --set model.moe_experts=4 --set model.moe_topk=2
        --set parallel.deterministic=off)
sig=(--set model.channel_mixer=sigma_moe --set model.sigma_moe_experts=4 --set model.sigma_moe_topk=2
     --set model.sigma_moe_group=16 --set model.sigma_moe_dropout=0.1)
run() {  # NAME RANKS EXTRA...: 16 sequences per step over RANKS ranks, the experts in RANKS shards
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
run m1 1
run m2 2
run m4 4
run c1 1 --set model.moe_capacity_factor=1
run c2 2 --set model.moe_capacity_factor=1
run s1 1 "${sig[@]}"
run s2 2 "${sig[@]}"
run s4 4 "${sig[@]}"
for name in m2 c2 s2; do
  grep -q "sharded over 2 ranks: this rank holds experts \[0, 2)" $name.log || { cat $name.log; fail "$name: not sharded"; }
done
for name in m4 s4; do
  grep -q "sharded over 4 ranks: this rank holds experts \[0, 1)" $name.log || { cat $name.log; fail "$name: not sharded"; }
done
/usr/bin/python3 - <<'PY'
from run_compare import track
track([("m1", "m2"), ("m1", "m4"), ("c1", "c2"), ("s1", "s2"), ("s1", "s4")], 1e-6,
      "step 1: the same per-token outputs, only the mean reordered")
PY
# Deterministic mode needs the CPU's exact sums: a config error naming the key on cuda.
expect_error "deterministic sharded moe on cuda" "parallel.deterministic" \
    mpi 2 "$bin" train "$src/configs/tiny.toml" "${common[@]}" --set parallel.backend=mpi \
    --set parallel.expert_parallel=2 --set parallel.deterministic=on --set run.name=det --set train.max_steps=1
echo "ok: sharded MoE and σ-MoE on GPUs: 2 and 4 shards track 1 rank within the stated tolerances"
