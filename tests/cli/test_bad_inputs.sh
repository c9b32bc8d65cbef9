# Bad input gives one clear message and a non-zero exit, and writes nothing misleading.
source "$(dirname "$0")/common.sh"
"$bin" prepare --input "$shared/tinyshakespeare/input.txt" --tokenizer byte --out good.h5 --quiet >/dev/null

printf '[optim]\nlearnig_rate = 0.1\n' > misspelled.toml
expect_error "misspelled key" "unknown key 'optim.learnig_rate'" "$bin" train misspelled.toml --set data.path=good.h5
printf '[optim]\nlr = -0.001\n' > negative.toml
expect_error "negative learning rate" "'optim.lr' = -0.001 is out of range" "$bin" train negative.toml --set data.path=good.h5
expect_error "missing data file" "missing.h5" "$bin" train "$src/configs/tiny.toml" --set data.path=missing.h5 --set run.out_dir=runs
[[ ! -e runs ]] || fail "a run directory was created for a missing data file"

# A token file whose ids exceed its vocabulary.
/usr/bin/python3 - <<'PY'
import h5py, shutil
shutil.copy("good.h5", "bad_ids.h5")
with h5py.File("bad_ids.h5", "r+") as f:
    f["train/tokens"][1000] = 300 if f["train/tokens"].dtype.itemsize > 1 else 255
    f.attrs["vocab_size"] = 256
PY
expect_error "token ids beyond the vocabulary" "300" "$bin" train "$src/configs/tiny.toml" --set data.path=bad_ids.h5 --set run.out_dir=runs
[[ ! -e runs ]] || fail "a run directory was created for a corrupt data file"

: > empty.txt
expect_error "empty input" "empty" "$bin" prepare --input empty.txt --tokenizer byte --out empty.h5
[[ ! -e empty.h5 ]] || fail "prepare left an output file for an empty input"
expect_error "missing input" "nothing_here.txt" "$bin" prepare --input nothing_here.txt --tokenizer byte --out x.h5
echo "not hdf5" > fake.h5
expect_error "not an HDF5 file" "fake.h5" "$bin" train "$src/configs/tiny.toml" --set data.path=fake.h5 --set run.out_dir=runs
expect_error "unknown option" "unknown option '--fast'" "$bin" train "$src/configs/tiny.toml" --fast
expect_error "model vocab smaller than data" "vocab" "$bin" train "$src/configs/tiny.toml" --set data.path=good.h5 --set model.vocab_size=100 --set run.out_dir=runs
