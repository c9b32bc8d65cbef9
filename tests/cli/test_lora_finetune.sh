# LoRA fine-tuning end to end on a tiny model (issue 19): a base trained a few steps, then
# `peerless finetune BASE CONFIG` in lora mode on chat data: the dry run prints trainable vs frozen
# parameters, the run records the base's sha256, every base tensor of the tuned model.h5 (weights,
# codes, β) is bit-identical to the base's while the adapters moved (the frozen ternary weights are
# stored as codes + β only: no latent), and 2 ranks (deterministic
# mode) give the same losses and tensors as 1 rank with 2 accumulation steps, also with ZeRO-1 on 2
# ranks, and a run resumed from a step-4 checkpoint continues bit for bit; with adapter dropout too.
source "$(dirname "$0")/common.sh"
source "$src/tests/cli/exact.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
"$bin" tasks 400 --seed 1 --out tasks.jsonl >/dev/null
"$bin" prepare --format chat --input tasks.jsonl --out tasks.h5 --quiet >/dev/null
"$bin" train "$src/configs/tiny.toml" --set data.path=ts.h5 --set run.out_dir=runs --set run.name=base \
  --set run.threads=1 --set train.sample_tokens=0 --set train.max_steps=10 >base.log
lora=(--set data.path=tasks.h5 --set data.seq_len=64 --set run.out_dir=runs --set run.threads=1
      --set train.sample_tokens=0 --set train.max_steps=8 --set train.micro_batch=2 --set train.log_every=1
      --set finetune.mode=lora --set finetune.lora_rank=4 --set optim.weight_decay=0 --set optim.lr=1e-2)
"$bin" finetune runs/base "$src/configs/tiny.toml" "${lora[@]}" --set run.name=dry --dry-run >dry.log
grep -Eq "^finetune: trainable [0-9,]+ parameters, frozen [0-9,]+ \(ternary [0-9,]+, held as int8 codes \+ beta only\)" \
  dry.log || { cat dry.log; fail "dry run line"; }
"$bin" finetune runs/base "$src/configs/tiny.toml" "${lora[@]}" --set run.name=tuned --set train.accum_steps=2 >tuned.log
sha=$(sha256sum runs/base/model.h5 | cut -d' ' -f1)
grep -q "base_sha256 = '$sha'" runs/tuned/config.toml || fail "the base's sha256 is not recorded"
/usr/bin/python3 - <<'PY'
import h5py, numpy as np
base, tuned = h5py.File("runs/base/model.h5"), h5py.File("runs/tuned/model.h5")
names = []
base.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and n.startswith(("model/", "ternary/")) else None)
assert len(names) > 10, names
latent_free = 0
for n in names:
    if n.startswith("model/") and "ternary/" + n[6:] in base:  # the frozen ternary base: codes + beta only
        assert n not in tuned, f"the codes-only base still stores the latent {n}"
        latent_free += 1
        continue
    assert np.array_equal(base[n][()], tuned[n][()]), f"frozen {n} changed"
for g in [n[:-len("/codes")] for n in names if n.endswith("/codes")]:
    assert base[g].attrs["beta"] == tuned[g].attrs["beta"], f"beta of {g} changed"
assert latent_free > 10, latent_free
moved = []
tuned.visititems(lambda n, o: moved.append(n) if n.endswith("/lora_B") and np.any(o[()] != 0) else None)
assert moved, "no adapter B moved from 0"
print(f"ok: {len(names)} base tensors bit-identical, {len(moved)} adapters trained")
PY
# Data parallel: 2 ranks x 1 micro-batch == 1 rank x 2 (deterministic mode, the CPU default).
config="$src/configs/tiny.toml"
common=("${lora[@]}" --set finetune.base=runs/base)
run_np dp1 0 2
run_np dp2 2 1 --set checkpoint.every_steps=4
run_np dp2z 2 1 --set parallel.zero1=true
same_runs --rows 9 dp1 dp2 dp2z
echo "ok: lora on 2 ranks (ZeRO-1 off and on) == 1 rank"
"$bin" train "$config" "${common[@]}" --set run.name=dp1r --set train.accum_steps=2 \
  --resume runs/dp2/checkpoints/step_4 > dp1r.log 2>&1 || { cat dp1r.log; fail "resume"; }
same_resume dp2 4 dp1r
echo "ok: a lora checkpoint of 2 ranks resumed on 1 continues bit for bit"
# The checkpoint holds the adapters, not the codes-only base: resuming on another base is an error
# naming finetune.base.
"$bin" train "$src/configs/tiny.toml" --set data.path=ts.h5 --set run.out_dir=runs --set run.name=base2 \
  --set run.threads=1 --set train.sample_tokens=0 --set train.max_steps=2 >base2.log
! "$bin" train "$config" "${lora[@]}" --set finetune.base=runs/base2 --set run.name=dp1x --set train.accum_steps=2 \
  --resume runs/dp2/checkpoints/step_4 >dp1x.log 2>&1 || fail "resumed on another base"
grep -q "finetune.base = runs/base2 has sha256" dp1x.log || { cat dp1x.log; fail "base mismatch message"; }
echo "ok: resuming on another base is refused, naming finetune.base"
# Adapter dropout (finetune.lora_dropout): keyed by (seed, step, module, global token), so 2 ranks
# give 1 rank's bits; it changes the run; the PEFT export records p as lora_dropout.
run_np dp1d 0 2 --set finetune.lora_dropout=0.2
run_np dp2d 2 1 --set finetune.lora_dropout=0.2
same_runs --rows 9 dp1d dp2d
! cmp -s runs/dp1/metrics.jsonl runs/dp1d/metrics.jsonl || fail "lora_dropout = 0.2 changed nothing"
"$bin" export runs/dp1d --format peft --out peft_d >/dev/null
grep -q '"lora_dropout": 0.2' peft_d/adapter_config.json || { cat peft_d/adapter_config.json; fail "lora_dropout export"; }
echo "ok: lora dropout on 2 ranks == 1 rank, exported as lora_dropout"
