# Speculative decoding from the command line (generate --draft MODEL|ngram --gamma N): on two small
# trained models (a target, and a smaller draft of the same byte vocabulary), greedy text with either
# drafter equals plain greedy text for 200 tokens, from a run directory and from GGUF files alike;
# sampling with a seed is reproducible; the report names acceptance and tokens per target pass; a
# draft of another vocabulary and a bad --gamma are clear errors.
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out ts.h5 --quiet >/dev/null
train() {
  "$bin" train "$src/configs/tiny.toml" --set data.path=ts.h5 --set run.out_dir=runs --set run.name="$1" \
    --set train.max_steps=40 --set train.sample_tokens=0 "${@:2}" > "$1.log"
}
train target --set model.d_model=128 --set model.intermediate=256
train draft --set model.d_model=32 --set model.intermediate=64 --set run.seed=3
train wide --set model.d_model=32 --set model.intermediate=64 --set model.vocab_size=300
"$bin" export runs/target --out target.gguf --embedding f32 --quiet > /dev/null
"$bin" export runs/draft --out draft.gguf --quiet > /dev/null
greedy() { "$bin" generate "$@" --prompt "ROMEO:" --tokens 200 --temperature 0 --quiet; }
greedy runs/target > plain.txt
[[ $(wc -c < plain.txt) -gt 200 ]] || fail "plain generate printed too little"
for args in "runs/target --draft runs/draft" "runs/target --draft draft.gguf --gamma 2" \
            "target.gguf --draft runs/draft --gamma 8" "runs/target --draft ngram" "target.gguf --draft ngram --gamma 3"; do
  # shellcheck disable=SC2086
  greedy $args > spec.txt
  cmp -s spec.txt plain.txt || { diff spec.txt plain.txt | head; fail "greedy text with $args differs from plain"; }
done
echo "ok: greedy speculative text (draft model, gguf draft, n-gram; gamma 2, 3, 4, 8) equals plain greedy"
sample() { "$bin" generate runs/target --draft runs/draft --prompt "KING" --tokens 60 --seed 7 --top-k 20 --top-p 0.9; }
sample > s1.txt 2> report.txt
sample > s2.txt 2> /dev/null
cmp -s s1.txt s2.txt || fail "speculative sampling with one seed is not reproducible"
grep -Eq "speculative \(draft runs/draft, gamma 4\): [0-9]+ target passes for [0-9]+ tokens = [0-9.]+ tokens/pass" \
  report.txt || { cat report.txt; fail "no speculative report"; }
grep -Eq "accepted [0-9]+ of [0-9]+ drafts, alpha [0-9.]+" report.txt || fail "no acceptance in the report"
grep -Eq "decode: 60 tokens in .* tokens/s" report.txt || fail "no decode speed in the report"
echo "ok: seeded speculative sampling reproducible; report: $(head -c 200 report.txt)"
expect_error "draft of another vocabulary" "vocabulary of 300 tokens but the target runs/target has 256" \
  "$bin" generate runs/target --draft runs/wide --tokens 5
expect_error "gamma 0" "gamma must be >= 1 \(got 0\)" "$bin" generate runs/target --draft ngram --gamma 0 --tokens 5
echo "ok: generate --draft"
