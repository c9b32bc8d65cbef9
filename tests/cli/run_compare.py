# What the GPU CLI tests (tests/cli/test_gpu_*.sh) read from their runs: the metrics rows, relative
# differences, and whether two saved models hold the same tensors. Imported by their inline Python
# (PYTHONPATH is this folder: common.sh exports it).
import json
import shutil
import subprocess


def rows(name):
    return [json.loads(l) for l in open(f"runs/{name}/metrics.jsonl")]


def rel(x, y):
    return abs(x - y) / abs(x)


def params_sha(name):
    line = [l for l in open(f"{name}.log") if l.startswith("parameters sha256: ")]
    assert len(line) == 1, (name, "no parameters sha256 line")
    return line[0].split()[-1]


def same_model(one, two):
    # Every dataset but the config text (it names the run): h5py where installed, else h5diff, else
    # (the GPU machine has neither) the trainer's SHA-256 of the saved parameters.
    try:
        import h5py
    except ImportError:
        if shutil.which("h5diff"):
            r = subprocess.run(["h5diff", "--exclude-path", "/config", f"runs/{one}/model.h5", f"runs/{two}/model.h5"])
            return r.returncode == 0, "h5diff"
        return params_sha(one) == params_sha(two), "parameters sha256 " + params_sha(one)[:16]
    out = []
    for name in (one, two):
        d = {}
        with h5py.File(f"runs/{name}/model.h5", "r") as f:
            f.visititems(lambda k, v: d.__setitem__(k, v[()].tobytes()) if isinstance(v, h5py.Dataset) and k != "config" else None)
        out.append(d)
    return out[0] == out[1] and len(out[0]) > 0, f"{len(out[0])} datasets"


def train_steps(name):
    # The training rows (metrics.jsonl ends with the final validation's row).
    return [r for r in rows(name) if "val_loss" not in r]


def track(pairs, step1, why, n=20, worst_bound=2e-2, mean_bound=5e-3, learned=0.3):
    # Sharded runs against their one-rank base, by relative loss difference: step 1 within `step1`
    # (the reason in `why`), every step within worst_bound, the mean within mean_bound, and both runs
    # learning (final loss at least `learned` nats below the first). Prints the figures.
    for base, name in pairs:
        a, b = train_steps(base), train_steps(name)
        assert len(a) == n and len(b) == n, (name, len(a), len(b))
        diffs = [rel(x["loss"], y["loss"]) for x, y in zip(a, b)]
        worst, mean = max(diffs), sum(diffs) / len(diffs)
        print(f"{name} vs {base}: step 1 {diffs[0]:.2e}, max {worst:.2e}, mean {mean:.2e} relative loss difference "
              f"(loss {a[0]['loss']:.4f} -> {a[-1]['loss']:.4f} vs {b[0]['loss']:.4f} -> {b[-1]['loss']:.4f})")
        assert diffs[0] < step1, (name, why, diffs[0])
        assert worst < worst_bound and mean < mean_bound, (name, worst, mean)
        for r_name, r in ((base, a), (name, b)):
            assert r[-1]["loss"] < r[0]["loss"] - learned, f"{r_name} did not learn"
