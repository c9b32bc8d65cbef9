#!/usr/bin/env python3
"""Independent check of a peerless FPGA bundle (../shared/FORMATS.md §7, docs/deployment-fpga.md).

Reads only the bundle directory and shares no code with the exporter: Python 3 and NumPy.
  - every file of the manifest (weights and golden vectors) exists with its byte count and sha256;
  - tensor shapes match the model section (d, L, I, V), β is finite, its decimal and f32 bits agree;
  - every weight stream decodes under the manifest's tile (rows, cols, order) and code map, with no
    invalid code, and with the code of 0 in every edge and tail slot;
  - per BitLinear golden: golden files hold rows·K or rows·N elements; from the golden x̃ it
    recomputes s = 127/max(max|x̃|, 1e-5) and a = clamp(round half away from zero(x̃·s), −128, 127)
    in float32, acc = a·tᵀ in int64 and y = f32(acc)·(f32(β)/s) in float32: a, s, acc and y must
    equal the golden files bit for bit; the two edge rows (all zero; products exactly on halves)
    are there;
  - block state / output and the final logits have their shapes; the logits equal the head's y.
Usage: fpga_check.py BUNDLE_DIR. Exit 0 on success (a summary on stdout), 1 on any mismatch (each
one named on stderr), 2 when it cannot run (no NumPy: Debian package python3-numpy).
"""
import hashlib
import json
import os
import sys

try:
    import numpy as np
except ImportError:
    sys.stderr.write("fpga_check.py needs NumPy: install the Debian package python3-numpy "
                     "(apt-get install python3-numpy)\n")
    sys.exit(2)

DTYPES = {"f32": np.dtype("<f4"), "i8": np.dtype("i1"), "i32": np.dtype("<i4")}
F32 = np.float32


class Mismatch(Exception):
    pass


class Checker:
    def __init__(self, root):
        self.root = root
        self.errors = []
        self.files = 0
        self.bytes = 0

    def fail(self, msg):
        self.errors.append(msg)

    def require(self, cond, msg):
        if not cond:
            raise Mismatch(msg)

    # ---- files ---------------------------------------------------------------------------------
    def read_file(self, entry, what):
        """Reads a manifest file entry, checking its byte count and sha256; returns its bytes."""
        for key in ("file", "bytes", "sha256"):
            self.require(key in entry, f"{what}: manifest entry lacks '{key}'")
        rel = entry["file"]
        self.require(not os.path.isabs(rel) and ".." not in rel.split("/"),
                     f"{what}: file '{rel}' is outside the bundle")
        path = os.path.join(self.root, rel)
        self.require(os.path.isfile(path), f"{what}: {rel} is missing")
        with open(path, "rb") as f:
            data = f.read()
        self.require(len(data) == entry["bytes"],
                     f"{what}: {rel} holds {len(data)} bytes, the manifest says {entry['bytes']}")
        digest = hashlib.sha256(data).hexdigest()
        self.require(digest == entry["sha256"],
                     f"{what}: {rel} sha256 {digest} != manifest {entry['sha256']}")
        self.files += 1
        self.bytes += len(data)
        return data

    def read_array(self, entry, what, shape=None):
        """A golden array: dtype and shape from the manifest (checked against `shape` if given)."""
        self.require(entry.get("dtype") in DTYPES, f"{what}: dtype {entry.get('dtype')!r} is not f32, i8 or i32")
        dt = DTYPES[entry["dtype"]]
        got = tuple(entry.get("shape", ()))
        if shape is not None:
            self.require(got == tuple(shape), f"{what}: shape {list(got)} != expected {list(shape)}")
        data = self.read_file(entry, what)
        n = int(np.prod(got, dtype=np.int64)) if got else 1
        self.require(len(data) == n * dt.itemsize,
                     f"{what}: {len(data)} bytes do not hold {n} elements of {entry['dtype']} (shape {list(got)})")
        return np.frombuffer(data, dtype=dt).reshape(got)

    # ---- weight streams ------------------------------------------------------------------------
    def decode_stream(self, data, N, K, tile, code_map, what):
        TR, TK, order = tile["rows"], tile["cols"], tile["order"]
        nt, kt = -(-N // TR), -(-K // TK)
        E = nt * kt * TR * TK
        raw = np.frombuffer(data, dtype=np.uint8)
        per_byte = 5 if code_map == "t5" else 4
        self.require(len(raw) == -(-E // per_byte),
                     f"{what}: {len(raw)} bytes, a {N}x{K} stream of {TR}x{TK} tiles in {code_map} needs "
                     f"{-(-E // per_byte)}")
        if code_map == "t5":
            bad = np.nonzero(raw > 242)[0]
            self.require(len(bad) == 0, f"{what}: byte {bad[:1].tolist()} = {raw[bad[:1]].tolist()} > 242 "
                         "is not 5 trits")
            c = (raw[:, None].astype(np.int32) // np.array([1, 3, 9, 27, 81], np.int32)) % 3
            t = c.reshape(-1).astype(np.int8) - 1
        else:
            q = (raw[:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
            q = q.reshape(-1)
            bad = np.nonzero(q == 3)[0]
            self.require(len(bad) == 0, f"{what}: element {int(bad[0]) if len(bad) else 0} has the invalid "
                         f"{code_map} code 3 (byte {int(bad[0]) // 4 if len(bad) else 0})")
            if code_map == "u2":
                t = q.astype(np.int8) - 1
            else:  # s2: 00 = 0, 01 = +1, 10 = -1
                t = np.array([0, 1, -1, 0], np.int8)[q]
        tail = t[E:]
        self.require(not tail.any(), f"{what}: the unused slots after element {E} do not hold the code of 0")
        t = t[:E]
        if order == "rk":
            grid = t.reshape(nt, kt, TR, TK).transpose(0, 2, 1, 3)
        elif order == "kr":
            grid = t.reshape(kt, nt, TR, TK).transpose(1, 2, 0, 3)
        else:
            raise Mismatch(f"tile order {order!r} is not rk or kr")
        grid = grid.reshape(nt * TR, kt * TK)
        self.require(not grid[N:, :].any() and not grid[:, K:].any(),
                     f"{what}: edge slots (rows >= {N} or inputs >= {K}) do not hold the code of 0")
        return np.ascontiguousarray(grid[:N, :K])

    # ---- the whole bundle ----------------------------------------------------------------------
    def run(self):
        path = os.path.join(self.root, "manifest.json")
        self.require(os.path.isfile(path), f"{path} is missing (not a bundle directory?)")
        with open(path, "rb") as f:
            m = json.loads(f.read().decode("utf-8"))
        self.require(m.get("format") == "peerless-fpga", f"manifest format {m.get('format')!r} != 'peerless-fpga'")
        self.require(m.get("version") == 1, f"manifest version {m.get('version')!r} != 1")
        for key in ("model", "quant", "code_map", "tile", "tensors", "golden"):
            self.require(key in m, f"manifest lacks '{key}'")
        model, tile, code_map = m["model"], m["tile"], m["code_map"]
        self.require(code_map in ("u2", "s2", "t5"), f"code_map {code_map!r} is not u2, s2 or t5")
        for key in ("rows", "cols"):
            self.require(isinstance(tile.get(key), int) and tile[key] >= 1, f"tile.{key} = {tile.get(key)!r}")
        self.require(tile.get("order") in ("rk", "kr"), f"tile.order {tile.get('order')!r} is not rk or kr")
        self.require("round half away from zero" in m["quant"].get("activations", "")
                     and "1e-5" in m["quant"]["activations"], "quant.activations is not the rule this check applies")
        self.require(m["quant"].get("accumulator") == "int32", "quant.accumulator is not int32")
        d, L, I, V = (model[k] for k in ("d", "L", "I", "V"))
        peer_blocks = set((model.get("peer") or {}).get("blocks", []))

        # Shapes the model implies for the ternary weights and gains (FORMATS §10 item 9).
        expect = {"token_embd.weight": [V, d], "output.weight": [V, d], "output.norm": [d],
                  "output_norm.weight": [d]}
        for l in range(L):
            b = f"blk.{l}."
            for x in ("mlgru_i", "mlgru_f", "mlgru_g", "mlgru_o"):
                expect[b + x + ".weight"] = [d, d]
                expect[b + x + ".norm"] = [d]
            for x in ("attn_norm.weight", "ffn_norm.weight", "mlgru_lb"):
                expect[b + x] = [d]
            if l not in peer_blocks:
                expect[b + "ffn_gate_up.weight"] = [2 * I, d]
                expect[b + "ffn_gate_up.norm"] = [d]
                expect[b + "ffn_down.weight"] = [d, I]
                expect[b + "ffn_down.norm"] = [I]

        weights = {}  # name -> (codes (N, K) int8, beta f32)
        names = set()
        for e in m["tensors"]:
            name = e.get("name", "?")
            what = f"tensor {name}"
            try:
                self.require(name not in names, f"{what}: listed twice")
                names.add(name)
                data = self.read_file(e, what)
                shape = e.get("shape")
                if name in expect:
                    self.require(shape == expect[name], f"{what}: shape {shape} != {expect[name]} from the model")
                if e.get("encoding") == "stream":
                    self.require(isinstance(shape, list) and len(shape) == 2, f"{what}: shape {shape} is not [N, K]")
                    bits = e.get("beta_bits", "")
                    self.require(isinstance(bits, str) and bits.startswith("0x") and len(bits) == 10,
                                 f"{what}: beta_bits {bits!r} is not 0x + 8 hex digits")
                    beta = np.array([int(bits, 16)], np.uint32).view(np.float32)[0]
                    self.require(np.isfinite(beta), f"{what}: beta {beta} is not finite")
                    self.require(F32(e.get("beta")) == beta,
                                 f"{what}: beta {e.get('beta')} does not read back as the f32 {bits} ({beta!r})")
                    t = self.decode_stream(data, shape[0], shape[1], tile, code_map, what)
                    self.require(beta > 0 or not t.any(), f"{what}: beta {beta} <= 0 with nonzero codes")
                    weights[name] = (t, beta)
                elif e.get("encoding") == "f32":
                    n = int(np.prod(shape, dtype=np.int64))
                    self.require(len(data) == 4 * n, f"{what}: {len(data)} bytes, f32 {shape} needs {4 * n}")
                    v = np.frombuffer(data, dtype="<f4")
                    self.require(np.isfinite(v).all(), f"{what}: holds a non-finite value")
                else:
                    raise Mismatch(f"{what}: encoding {e.get('encoding')!r} is not stream or f32")
            except Mismatch as err:
                self.fail(str(err))
        for name, shape in expect.items():
            if name not in names:
                self.fail(f"tensor {name} {shape} is missing from the manifest")

        linears = rows_checked = 0
        prompt_rows = None
        head_y = logits = None
        for g in m["golden"]:
            layer, tensor, files = g.get("layer", "?"), g.get("tensor", "?"), g.get("files", {})
            what = f"golden {layer}/{tensor}"
            try:
                if "weight" in g:  # a BitLinear
                    self.require(g["weight"] in weights, f"{what}: not checked, its weight {g['weight']} is not a "
                                 "stream that decoded (see above)")
                    t, beta = weights[g["weight"]]
                    N, K = t.shape
                    T = g.get("prompt_rows")
                    R = T + 2
                    prompt_rows = T if prompt_rows is None else prompt_rows
                    self.require(T == prompt_rows, f"{what}: {T} prompt rows, others have {prompt_rows}")
                    xt = self.read_array(files["x_tilde"], what + ".x_tilde", (R, K))
                    a = self.read_array(files["a"], what + ".a", (R, K))
                    s = self.read_array(files["s"], what + ".s", (R,))
                    acc = self.read_array(files["acc"], what + ".acc", (R, N))
                    y = self.read_array(files["y"], what + ".y", (R, N))
                    self.check_linear(what, xt, a, s, acc, y, t, beta)
                    linears += 1
                    rows_checked += R
                    if g["weight"] == "output.weight":
                        head_y = y
                elif tensor == "block":
                    T = prompt_rows or 8
                    self.read_array(files["h"], what + ".h", (T, d))
                    self.read_array(files["x"], what + ".x", (T, d))
                elif tensor == "final":
                    logits = self.read_array(files["logits"], what + ".logits", None)
                elif tensor == "prompt":
                    ids = self.read_array(files["ids"], what + ".ids", None)
                    self.require(ids.ndim == 1 and ((ids >= 0) & (ids < V)).all(), f"{what}: ids outside [0, {V})")
                else:
                    for field, fe in files.items():
                        self.read_array(fe, f"{what}.{field}", None)
            except (Mismatch, KeyError, TypeError) as err:
                self.fail(str(err) if isinstance(err, Mismatch) else f"{what}: malformed entry ({err!r})")
        if logits is not None and head_y is not None:
            T = logits.shape[0]
            if logits.shape != (T, V) or not np.array_equal(logits.view(np.uint32), head_y[:T].view(np.uint32)):
                self.fail(f"golden final logits {list(logits.shape)} differ from the head's y rows 0..{T - 1}")
        if linears == 0:
            self.fail("the manifest lists no BitLinear golden vectors")
        return linears, rows_checked, len(weights)

    def check_linear(self, what, xt, a, s, acc, y, t, beta):
        self.require(np.isfinite(xt).all(), f"{what}: x_tilde holds a non-finite value")
        # s = 127 / max(max|x̃|, 1e-5), float32
        amax = np.max(np.abs(xt), axis=1)
        s_ref = F32(127) / np.maximum(amax, F32(1e-5))
        self.require(s_ref.dtype == np.float32, "internal: s not float32")
        self.bitwise(what + ".s", s_ref, s)
        # a = clamp(round half away from zero(x̃·s), −128, 127)
        v = xt * s_ref[:, None]
        tr = np.trunc(v)
        r = np.where(np.abs(v - tr) >= F32(0.5), tr + np.copysign(F32(1), v), tr)
        a_ref = np.clip(r, -128, 127).astype(np.int8)
        if not np.array_equal(a_ref, a):
            i, j = np.argwhere(a_ref != a)[0]
            raise Mismatch(f"{what}.a: row {i} input {j}: golden {a[i, j]}, recomputed {a_ref[i, j]} "
                           f"(x̃ = {xt[i, j]!r}, s = {s_ref[i]!r})")
        acc_ref = a_ref.astype(np.int64) @ t.astype(np.int64).T
        self.require(np.abs(acc_ref).max(initial=0) < 2**31, f"{what}: an accumulator leaves int32")
        if not np.array_equal(acc_ref, acc.astype(np.int64)):
            i, j = np.argwhere(acc_ref != acc)[0]
            raise Mismatch(f"{what}.acc: row {i} output {j}: golden {acc[i, j]}, recomputed {acc_ref[i, j]}")
        factor = F32(beta) / s_ref  # float32
        y_ref = acc_ref.astype(np.float32) * factor[:, None]
        self.bitwise(what + ".y", y_ref, y)
        # The edge rows: all zeros (the 1e-5 floor), then products exactly on halves.
        R = xt.shape[0]
        self.require(not xt[R - 2].any(), f"{what}: edge row {R - 2} is not all zero")
        half = v[R - 1] - np.trunc(v[R - 1])
        self.require((np.abs(half) == F32(0.5)).any(), f"{what}: edge row {R - 1} has no x̃·s exactly at .5")

    def bitwise(self, what, ref, got):
        ref = np.ascontiguousarray(ref, dtype=np.float32)
        got = np.ascontiguousarray(got, dtype=np.float32)
        if not np.array_equal(ref.view(np.uint32), got.view(np.uint32)):
            idx = tuple(np.argwhere(ref.view(np.uint32) != got.view(np.uint32))[0])
            raise Mismatch(f"{what}: at {list(map(int, idx))} golden {got[idx]!r} ({got[idx].view(np.uint32):#010x}), "
                           f"recomputed {ref[idx]!r} ({ref[idx].view(np.uint32):#010x})")


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: fpga_check.py BUNDLE_DIR\n")
        return 2
    c = Checker(argv[1])
    try:
        linears, rows, streams = c.run()
    except Mismatch as err:
        c.fail(str(err))
    except (OSError, ValueError) as err:  # unreadable or malformed manifest
        c.fail(f"cannot read the bundle: {err}")
    if c.errors:
        for e in c.errors[:50]:
            sys.stderr.write(f"FAIL: {e}\n")
        if len(c.errors) > 50:
            sys.stderr.write(f"... and {len(c.errors) - 50} more\n")
        sys.stderr.write(f"fpga_check: {argv[1]}: {len(c.errors)} mismatch(es)\n")
        return 1
    print(f"fpga_check: {argv[1]}: ok: {c.files} files ({c.bytes} bytes) match the manifest's sizes and sha256; "
          f"{streams} weight streams decoded; {linears} BitLinears x {rows // max(linears, 1)} rows: "
          "a, s, acc and y equal the recomputation bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
