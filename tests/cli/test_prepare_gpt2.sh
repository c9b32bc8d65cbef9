# `peerless prepare --tokenizer gpt2:DIR` on Tiny Shakespeare: the GPT-2 ids of its first words and
# nanoGPT's token counts (301,966 train, 36,059 val), as listed in ../shared/data/README.md.
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer "gpt2:$shared/gpt2" --out ts-gpt2.h5 > out.txt
cat out.txt
/usr/bin/python3 - <<'PY'
import h5py
with h5py.File("ts-gpt2.h5", "r") as f:
    train, val = f["train/tokens"], f["val/tokens"]
    assert train.shape[0] == 301966, train.shape
    assert val.shape[0] == 36059, val.shape
    first = [int(t) for t in train[:7]]
    # encode("First Citizen:\nBefore we proceed")
    assert first == [5962, 22307, 25, 198, 8421, 356, 5120], first
    assert f.attrs["vocab_size"] == 50257 and f.attrs["tokenizer"] in ("gpt2", b"gpt2")
print("ok: GPT-2 ids and Tiny Shakespeare counts")
PY
h5dump -H ts-gpt2.h5 | grep -q 'ATTRIBUTE "vocab_size"' || fail "h5dump does not show the attributes"
