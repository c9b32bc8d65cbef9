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
