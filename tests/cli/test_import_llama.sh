# BASELINES/issue 15's external check from the command line: `peerless import` of a llama.cpp
# `llama` GGUF (stories260K, GGUF v1, f32, GQA 8:4), then greedy sampling from BOS prints the
# reference text (../shared/data/tinyllamas-stories260k/greedy_t0_257.txt, the decoding of the 257
# pinned ids); the imported model file also evaluates and fine-tunes (a few training steps).
source "$(dirname "$0")/common.sh"
ref="$shared/tinyllamas-stories260k"
"$bin" import "$ref/tinyllamas-stories-260k-f32.gguf" --out stories.h5 | grep -q "wrote stories.h5 (292,800 parameters)" \
  || fail "import did not report the 292,800 parameters"
# An empty prompt is BOS alone; generation prints the continuation (its first piece keeps the
# space SentencePiece's decode drops at the start of a text).
"$bin" sample stories.h5 --prompt "" --temperature 0 --tokens 257 > out.txt
sed '1s/^ //' out.txt | cmp - "$ref/greedy_t0_257.txt" || { diff <(sed '1s/^ //' out.txt) "$ref/greedy_t0_257.txt" | head; fail "greedy text differs from the reference"; }
echo "ok: greedy from BOS = greedy_t0_257.txt ($(wc -c < out.txt) bytes)"
expect_error "speculative needs a MatMul-free target" "speculative decoding needs a MatMul-free target" \
  "$bin" generate stories.h5 --draft ngram --tokens 5
