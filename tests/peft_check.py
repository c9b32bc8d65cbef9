#!/usr/bin/env python3
"""An independent reader of a PEFT LoRA export (peerless export --format peft; FORMATS §4-§5), stdlib
only (struct + json), sharing no code with the writer:

    peft_check.py DIR --expect LEAF=N,K [--expect ...] [--modules COUNT] [--gguf ADAPTER.gguf]

Parses DIR/adapter_model.safetensors (u64 header length, JSON header, dtype/shape/data_offsets, the
tiling and bounds rules of the reference reader) and DIR/adapter_config.json, then checks every
tensor name (base_model.model.<module>.lora_A|lora_B.weight), that each module has both, A [r, K]
and B [N, r] with r from the config and (N, K) from --expect for the module's last component, that
target_modules are exactly the modules' last components, and that the values are finite. With
--gguf, also parses the GGUF LoRA adapter of the same run (FORMATS §1, §5): general.type "adapter",
adapter.type "lora", adapter.lora.alpha = lora_alpha, only <tensor>.lora_a {K, r} / .lora_b {r, N}
F32 pairs, aligned in-bounds data, and the same A and B bytes as the PEFT file. Exits 1 with a
message naming the file and field on the first failure."""
import json
import math
import os
import struct
import sys

DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "U16": 16, "I16": 16, "F16": 16, "BF16": 16, "U32": 32,
              "I32": 32, "F32": 32, "U64": 64, "I64": 64, "F64": 64}
PREFIX, SUFFIXES = "base_model.model.", (".lora_A.weight", ".lora_B.weight")


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def read_safetensors(path):
    data = open(path, "rb").read()
    if len(data) < 8:
        fail(f"{path}: {len(data)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > 100_000_000 or 8 + n > len(data):
        fail(f"{path}: header length {n} exceeds the file ({len(data)} bytes) or 1e8")
    text = data[8:8 + n].decode("utf-8")
    if not text.startswith("{"):
        fail(f"{path}: the header does not start with '{{'")
    pairs = json.loads(text, object_pairs_hook=lambda kv: kv)
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        fail(f"{path}: duplicate keys in the header")
    header = dict(pairs)
    meta = dict(header.pop("__metadata__", []))
    if meta.get("format") != "pt":
        fail(f"{path}: __metadata__.format = {meta.get('format')!r} (transformers needs 'pt')")
    if not all(isinstance(v, str) for v in meta.values()):
        fail(f"{path}: __metadata__ values must be strings")
    buffer = data[8 + n:]
    tensors, end = {}, 0
    for name, info in sorted(header.items(), key=lambda kv: dict(kv[1])["data_offsets"][0]):
        info = dict(info)
        dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BITS:
            fail(f"{path}: {name} has unknown dtype {dtype}")
        numel = math.prod(shape)
        if begin != end or stop - begin != numel * DTYPE_BITS[dtype] // 8:
            fail(f"{path}: {name} data_offsets [{begin}, {stop}) do not tile the buffer at {end} "
                 f"with {numel} x {dtype}")
        end = stop
        tensors[name] = (dtype, shape, buffer[begin:stop])
    if end != len(buffer):
        fail(f"{path}: tensors end at {end}, the buffer has {len(buffer)} bytes")
    return meta, tensors


GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                12: "<d"}


def read_gguf(path):
    data = open(path, "rb").read()
    pos = 0

    def take(fmt):
        nonlocal pos
        if pos + struct.calcsize(fmt) > len(data):
            fail(f"{path}: truncated at byte {pos}")
        v = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v[0] if len(v) == 1 else v

    def string():
        nonlocal pos
        n = take("<Q")
        if pos + n > len(data):
            fail(f"{path}: string of {n} bytes past the end")
        pos += n
        return data[pos - n:pos].decode("utf-8")

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, count = take("<I"), take("<Q")
            return [value(et) for _ in range(count)]
        if t not in GGUF_SCALARS:
            fail(f"{path}: kv type {t} is not 0..12")
        return take(GGUF_SCALARS[t])

    magic, version, n_tensors, n_kv = take("<4sIQQ")
    if magic != b"GGUF" or version != 3:
        fail(f"{path}: magic {magic!r}, version {version} (GGUF v3 expected)")
    kv = {}
    for _ in range(n_kv):
        key = string()
        kv[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        ne = [take("<Q") for _ in range(take("<I"))]
        infos.append((name, ne, take("<I"), take("<Q")))
    align = kv.get("general.alignment", 32)
    start = (pos + align - 1) // align * align
    tensors = {}
    for name, ne, t, off in infos:
        nbytes = 4 * math.prod(ne)
        if t != 0 or off % align or start + off + nbytes > len(data):
            fail(f"{path}: {name} type {t}, offset {off}: not F32, unaligned or past the end")
        tensors[name] = (ne, data[start + off:start + off + nbytes])
    return kv, tensors


def check_gguf(path, cfg, st_tensors):
    kv, tensors = read_gguf(path)
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora"), ("general.architecture", "peerless")):
        if kv.get(key) != want:
            fail(f"{path}: {key} = {kv.get(key)!r}, expected {want!r}")
    if abs(kv.get("adapter.lora.alpha", -1) - cfg["lora_alpha"]) > 1e-6 * cfg["lora_alpha"]:
        fail(f"{path}: adapter.lora.alpha = {kv.get('adapter.lora.alpha')}, the config's {cfg['lora_alpha']}")
    r, got = cfg["r"], {"a": [], "b": []}
    for name, (ne, raw) in tensors.items():
        base, _, kind = name.rpartition(".lora_")
        if kind not in got or not base.endswith(".weight") or (base + ".lora_" + ("b" if kind == "a" else "a")) \
                not in tensors:
            fail(f"{path}: tensor {name} is not half of a <tensor>.lora_a/.lora_b pair")
        if (kind == "a" and ne[1] != r) or (kind == "b" and ne[0] != r):
            fail(f"{path}: {name} has ne {ne}, rank {r} expected at ne[{1 if kind == 'a' else 0}]")
        got[kind].append(raw)
    peft = {"a": sorted(raw for n, (_, _, raw) in st_tensors.items() if n.endswith(".lora_A.weight")),
            "b": sorted(raw for n, (_, _, raw) in st_tensors.items() if n.endswith(".lora_B.weight"))}
    if sorted(got["a"]) != peft["a"] or sorted(got["b"]) != peft["b"]:
        fail(f"{path}: the adapter's A/B bytes differ from the PEFT export's")
    print(f"ok: {path}: {len(tensors) // 2} lora_a/lora_b pairs, alpha {kv['adapter.lora.alpha']}, "
          f"same bytes as the PEFT export")


def main(argv):
    d = argv[1]
    expect, modules_expected, gguf = {}, None, None
    args = argv[2:]
    for flag, value in zip(args[::2], args[1::2]):
        if flag == "--expect":
            leaf, dims = value.split("=")
            expect[leaf] = tuple(int(x) for x in dims.split(","))
        elif flag == "--modules":
            modules_expected = int(value)
        elif flag == "--gguf":
            gguf = value
    cfg_path = os.path.join(d, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    for key, want in (("peft_type", "LORA"), ("task_type", "CAUSAL_LM"), ("bias", "none"),
                      ("fan_in_fan_out", False), ("use_dora", False)):
        if cfg.get(key) != want:
            fail(f"{cfg_path}: {key} = {cfg.get(key)!r}, expected {want!r}")
    r = cfg["r"]
    if not isinstance(r, int) or r < 1 or not isinstance(cfg["lora_alpha"], (int, float)):
        fail(f"{cfg_path}: r = {r!r}, lora_alpha = {cfg.get('lora_alpha')!r}")
    st_path = os.path.join(d, "adapter_model.safetensors")
    _, tensors = read_safetensors(st_path)
    modules = {}
    for name, (dtype, shape, raw) in tensors.items():
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        if not name.startswith(PREFIX) or suffix is None:
            fail(f"{st_path}: tensor {name} is not {PREFIX}<module>.lora_A|lora_B.weight")
        if dtype != "F32" or len(shape) != 2:
            fail(f"{st_path}: {name} is {dtype} {shape}, expected a 2-D F32 matrix")
        values = struct.unpack(f"<{len(raw) // 4}f", raw)
        if not all(math.isfinite(v) for v in values):
            fail(f"{st_path}: {name} holds a non-finite value")
        modules.setdefault(name[len(PREFIX):-len(suffix)], {})[suffix[6]] = shape
    leaves = set()
    for module, ab in sorted(modules.items()):
        if set(ab) != {"A", "B"}:
            fail(f"{st_path}: module {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        leaf = module.rsplit(".", 1)[-1]
        leaves.add(leaf)
        if leaf not in expect:
            fail(f"{st_path}: module {module}: no --expect for {leaf}")
        n, k = expect[leaf]
        if ab["A"] != [r, k] or ab["B"] != [n, r]:
            fail(f"{st_path}: {module} has A {ab['A']}, B {ab['B']}; expected A [{r}, {k}], B [{n}, {r}]")
    if sorted(leaves) != sorted(cfg["target_modules"]):
        fail(f"{cfg_path}: target_modules {cfg['target_modules']} != the modules' {sorted(leaves)}")
    if modules_expected is not None and len(modules) != modules_expected:
        fail(f"{st_path}: {len(modules)} adapted modules, expected {modules_expected}")
    print(f"ok: {len(modules)} modules, r = {r}, alpha = {cfg['lora_alpha']}, targets {sorted(leaves)}")
    if gguf:
        check_gguf(gguf, cfg, tensors)


if __name__ == "__main__":
    main(sys.argv)
