# LoRA adapters outside their run (issue 19; launch/lora_adapter.h): a tiny ternary base and a lora
# run tuned from it; `export --format peft` read back by an independent stdlib reader
# (tests/peft_check.py: names, shapes against the config, bounds) and `--format gguf-lora` with the
# same bytes; `generate BASE --lora PEFT_DIR` (and --lora RUN) reproduces the tuned run's own greedy
# output token for token, unmerged; `merge` refuses the ternary base and, on a full-precision base,
# gives the unmerged model's greedy output; wrong bases and bad adapters are clear errors.
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
"$bin" tasks 200 --seed 1 --out tasks.jsonl >/dev/null
"$bin" prepare --format chat --input tasks.jsonl --out tasks.h5 --quiet >/dev/null
base=(--set data.path=ts.h5 --set run.out_dir=runs --set run.threads=1 --set train.sample_tokens=0
      --set train.max_steps=10)
lora=(--set data.path=tasks.h5 --set data.seq_len=64 --set run.out_dir=runs --set run.threads=1
      --set train.sample_tokens=0 --set train.max_steps=8 --set train.micro_batch=2 --set finetune.mode=lora
      --set finetune.lora_rank=4 --set optim.weight_decay=0 --set optim.lr=1e-2)
"$bin" train "$src/configs/tiny.toml" "${base[@]}" --set run.name=base >base.log
"$bin" finetune runs/base "$src/configs/tiny.toml" "${lora[@]}" --set run.name=tuned >tuned.log
"$bin" export runs/tuned --format peft --out peft >/dev/null
"$bin" export runs/tuned --format gguf-lora --out adapter.gguf >/dev/null
# tiny.toml: d 32, I 64 (gate_proj holds gate and up: 2I rows), 2 blocks x 6 projections.
/usr/bin/python3 "$src/tests/peft_check.py" peft --modules 12 --gguf adapter.gguf --expect i_proj=32,32 \
  --expect f_proj=32,32 --expect g_proj=32,32 --expect o_proj=32,32 --expect gate_proj=128,32 --expect down_proj=32,64

gen() { "$bin" generate "$@" --prompt "### User:" --tokens 24 --temperature 0 --threads 1 --quiet; }
gen runs/tuned >tuned.txt
gen runs/base --lora peft >peft.txt
gen runs/base --lora runs/tuned >run.txt
gen runs/base >base.txt
cmp tuned.txt peft.txt || fail "generate --lora PEFT differs from the tuned run: $(cat tuned.txt) | $(cat peft.txt)"
cmp tuned.txt run.txt || fail "generate --lora RUN differs from the tuned run"
cmp -s tuned.txt base.txt && fail "the adapters change nothing (the check above would be vacuous)"
"$bin" sample runs/base --lora peft --prompt "### User:" --tokens 24 --temperature 0 >sample.txt
cmp tuned.txt sample.txt || fail "sample --lora differs from the tuned run"
echo "ok: generate/sample --lora (PEFT export and run) == the tuned run, token for token: $(tail -c 40 tuned.txt)"

expect_error "merge a ternary base" "is ternary.*not beta·T.*generate BASE --lora" \
  "$bin" merge runs/base peft --out merged.h5
"$bin" train "$src/configs/tiny.toml" "${base[@]}" --set run.name=other --set run.seed=3 >other.log
expect_error "adapter on another base" "trained on runs/base .*sha256.*give the base it was tuned from" \
  "$bin" generate runs/other --lora peft --tokens 2
expect_error "not an adapter" "neither a PEFT directory" "$bin" generate runs/base --lora adapter.gguf --tokens 2
head -c 50 peft/adapter_model.safetensors >bad.safetensors && mv bad.safetensors peft/adapter_model.safetensors
expect_error "truncated adapter" "adapter_model.safetensors" "$bin" generate runs/base --lora peft --tokens 2

# A full-precision base (model.quant = none): merge gives the unmerged model's greedy output.
"$bin" train "$src/configs/tiny.toml" "${base[@]}" --set model.quant=none --set run.name=fbase >fbase.log
"$bin" finetune runs/fbase "$src/configs/tiny.toml" "${lora[@]}" --set model.quant=none --set run.name=ftuned >ftuned.log
"$bin" export runs/ftuned --format peft --out fpeft >/dev/null
"$bin" merge runs/fbase fpeft --out merged.h5 >/dev/null
gen merged.h5 >merged.txt
gen runs/fbase --lora fpeft >unmerged.txt
gen runs/ftuned >ftuned.txt
cmp merged.txt unmerged.txt || fail "merged differs from unmerged: $(cat merged.txt) | $(cat unmerged.txt)"
cmp ftuned.txt unmerged.txt || fail "unmerged differs from the tuned run"
echo "ok: merged full-precision model == unmerged adapters, greedy: $(tail -c 40 merged.txt)"
