# Bit-identical data and expert parallelism under every OpenBLAS kernel family this processor can
# run. The CPU model's products go through OpenBLAS (model/ops/gemm.cpp), whose dynamic-arch build
# picks its kernels at load time (OPENBLAS_CORETYPE overrides the choice); each family sums in its
# own order, so exactness across world sizes must hold with each of them, not only the native one.
# For the native choice (OPENBLAS_CORETYPE unset) and each family named below whose instructions
# /proc/cpuinfo lists (Haswell: avx2 + fma; SkylakeX: avx512 f/cd/bw/dq/vl; Cooperlake: + avx512_bf16;
# ...; a family the CPU lacks would crash, so it is left out and said so) this runs, 20 steps each,
# under mpirun -np 1, 2 and 4 (same global batch of 8 sequences, run.threads = 1):
#   - the dense tiny model (d 64): 1 x 4 accumulation, 2 x 2 with ZeRO-1, 4 x 1;
#   - a PEER model (N = 64² experts): 1 x 4, 2 x 2 with the table in 2 shards, 4 x 1 in 4 shards;
# and fails unless the runs of each model are bit-identical (tests/cli/exact.sh: losses, gradient
# norms, validation losses, model.h5 tensors with ==). Each run's log must show that OpenBLAS used
# the requested family on every rank (OPENBLAS_VERBOSE=2 prints "Core: <name>"). A family that this
# OpenBLAS build cannot select by name but detects natively (0.3.21: Cooperlake) is covered by the
# native run. Whether the families agree with each other is printed, not required (they may round
# differently). Fails, never skips, when mpirun is missing, ranks do not come up, or Haswell cannot
# be selected on a CPU with avx2 + fma.
source "$(dirname "$0")/common.sh"
source "$src/tests/cli/exact.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null

# Family: the /proc/cpuinfo flags its kernels need (x86-64 dynamic-arch OpenBLAS names).
families=("Prescott:pni" "Core2:ssse3" "Penryn:sse4_1" "Nehalem:sse4_2" "Barcelona:sse4a"
          "Sandybridge:avx" "Haswell:avx2 fma" "Zen:avx2 fma"
          "SkylakeX:avx512f avx512cd avx512bw avx512dq avx512vl"
          "Cooperlake:avx512f avx512cd avx512bw avx512dq avx512vl avx512_bf16"
          "SapphireRapids:avx512f avx512cd avx512bw avx512dq avx512vl avx512_bf16 avx512_fp16 amx_tile amx_bf16")
read -ra cpu_flags <<< "$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)"
has_flag() { local f; for f in "${cpu_flags[@]}"; do [[ "$f" == "$1" ]] && return 0; done; return 1; }
# core_of [NAME]: the family OpenBLAS loads with OPENBLAS_CORETYPE=NAME (unset: native detection).
core_of() {
  local out
  if [[ -n "${1:-}" ]]; then out=$(OPENBLAS_VERBOSE=2 OPENBLAS_CORETYPE="$1" "$bin" --help 2>&1)
  else out=$(env -u OPENBLAS_CORETYPE OPENBLAS_VERBOSE=2 "$bin" --help 2>&1); fi
  grep -q "Core not found: ${1:-}" <<< "$out" && [[ -n "${1:-}" ]] && { echo "not-selectable"; return; }
  sed -n 's/^Core: \([A-Za-z0-9]*\).*/\1/p' <<< "$out" | head -1
}
native=$(core_of)
[[ -n "$native" ]] || fail "OpenBLAS does not report its core with OPENBLAS_VERBOSE=2 (not a dynamic-arch build?)"
echo "native OpenBLAS core: $native"
tested=("native:$native")
for entry in "${families[@]}"; do
  name="${entry%%:*}"; ok=1
  for f in ${entry#*:}; do has_flag "$f" || { ok=0; echo "skip: $name (this CPU lacks $f)"; break; }; done
  if [[ $ok == 0 ]]; then
    [[ $name == Haswell ]] && has_flag avx2 && has_flag fma && fail "Haswell skipped on a CPU with avx2 + fma"
    continue
  fi
  core=$(core_of "$name")
  if [[ "$core" == not-selectable ]]; then
    [[ $name == Haswell ]] && fail "this OpenBLAS cannot select Haswell by name"
    [[ $name == "$native" ]] && echo "covered: $name (not selectable by name in this OpenBLAS; the native core)" \
      || echo "skip: $name (this OpenBLAS build does not know it)"
    continue
  fi
  [[ "$core" == "$name" ]] || fail "OPENBLAS_CORETYPE=$name loads core '$core'"
  [[ "$core" == "$native" ]] && { echo "covered: $name (the native core)"; continue; }
  tested+=("$name:$core")
done
if has_flag avx2 && has_flag fma; then
  printf '%s\n' "${tested[@]}" | grep -q ":Haswell$" || fail "Haswell not among the tested families"
fi
echo "families tested: ${tested[*]}"

dense=(--set data.path=ts.h5 --set run.out_dir=runs --set run.threads=1 --set train.sample_tokens=0
       --set train.micro_batch=2 --set train.log_every=1 --set train.eval_every=10 --set train.final_eval_windows=4
       --set train.max_steps=20 --set model.d_model=64 --set model.intermediate=128)
peer=("${dense[@]}" --set model.d_model=32 --set model.intermediate=64 --set model.peer_blocks=0
      --set model.peer_n_sub=64 --set model.peer_heads=2 --set model.peer_topk=4 --set model.peer_key_dim=16)
# cored NAME NP CORE: the run's log shows OpenBLAS core CORE on each of its NP ranks.
cored() {
  local n
  n=$(grep -c "^Core: $3\b" "$1.log" || true)
  [[ "$n" == "$2" ]] || { grep "Core" "$1.log" | head; fail "$1: expected 'Core: $3' from $2 rank(s), found $n"; }
}
for entry in "${tested[@]}"; do
  fam="${entry%%:*}"; core="${entry#*:}"
  export OPENBLAS_VERBOSE=2
  if [[ $fam == native ]]; then unset OPENBLAS_CORETYPE; else export OPENBLAS_CORETYPE="$fam"; fi
  echo "== $fam (OpenBLAS core $core)"
  common=("${dense[@]}")
  run_np "${fam}_d1" 1 4
  run_np "${fam}_d2z" 2 2 --set parallel.zero1=true
  run_np "${fam}_d4" 4 1
  common=("${peer[@]}")
  run_np "${fam}_p1" 1 4
  run_np "${fam}_p2" 2 2 --set parallel.expert_parallel=2
  run_np "${fam}_p4" 4 1 --set parallel.expert_parallel=4
  grep -q "sharded by rows over 4 ranks" "${fam}_p4.log" || fail "${fam}_p4: the table is not in 4 shards"
  for r in d1:1 d2z:2 d4:4 p1:1 p2:2 p4:4; do cored "${fam}_${r%%:*}" "${r#*:}" "$core"; done
  unset OPENBLAS_CORETYPE OPENBLAS_VERBOSE  # the comparison's numpy need not use the family
  same_runs --rows 21 "${fam}_d1" "${fam}_d2z" "${fam}_d4"
  same_runs --rows 21 "${fam}_p1" "${fam}_p2" "${fam}_p4"
done

# Information: do the families agree with each other (not required)?
/usr/bin/python3 - "${tested[@]}" <<'PY'
import json, sys
fams = [e.split(":")[0] for e in sys.argv[1:]]
def rows(name):
    return [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"} for l in open(f"runs/{name}/metrics.jsonl")]
for model in ("d1", "p1"):
    ref = rows(f"{fams[0]}_{model}")
    for fam in fams[1:]:
        other = rows(f"{fam}_{model}")
        first = next((i for i, (a, b) in enumerate(zip(ref, other)) if a != b), None)
        if first is None:
            print(f"info: {'dense' if model == 'd1' else 'PEER'}: {fam} == {fams[0]} bit for bit")
            continue
        a, b = ref[first], other[first]
        diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
        print(f"info: {'dense' if model == 'd1' else 'PEER'}: {fam} differs from {fams[0]} first at step {a['step']}: {diff}")
PY
echo "ok: 1/2/4 ranks bit-identical (dense with ZeRO-1, PEER in 2 and 4 shards) under OpenBLAS ${tested[*]}"
