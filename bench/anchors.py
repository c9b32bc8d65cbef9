#!/usr/bin/env python3
"""The public anchors of issue 20, timed on the GPU machine beside `peerless bench train` and
`peerless bench peer-layer` (bench/gpu_anchors.sh runs all four in one job):

  mmfreelm  ridgerchu/matmulfreellm (Triton kernels): its HGRN-Bit causal LM at our config (default
            configs/mmf-370m.toml: d 1024, 24 layers, I 2816, vocab 32000; the MLGRU has one head,
            its recurrence is per channel), trained on random tokens at T 2048 under bf16 autocast with
            fp32 master weights and torch.optim.AdamW(fused=True): tokens/s, MFU = 6·N·tokens/s over a
            bf16 matmul peak measured here (torch.matmul, 8192², bench/torch_mmf.py's probe), and
            peak memory (torch.cuda.max_memory_allocated over the timed steps).
  peer      lucidrains/PEER-pytorch: its PEER layer at our `bench peer-layer` shape (d 1024, N = 1024²
            experts, h 8, k 16 per head, query width 512 per head = two sub-keys of 256, ReLU experts),
            fp32, forward + backward of out.sum() on x (batch × seq tokens, default 4 × 2048), x's
            gradient included: tokens/s and peak memory. Softmax over each head's k scores
            (non_competing_scores=False) so that k experts per head are mixed, as SPEC §3 and our
            layer do; the library's default (ReLU scores, one expert per head) is --non-competing.
            The parameter gradients accumulate across iterations (never zeroed, as a model step's
            would be once per step; their values do not matter here).

Each timed figure: --warmup untimed steps (Triton compiles and autotunes there), then --steps timed
ones between torch.cuda.synchronize() calls. One JSON line per run, then a table.

The snapshots are git-ignored and never committed: <repo>/.anchors/matmulfreellm (ridgerchu/
matmulfreellm) and <repo>/.anchors/PEER-pytorch (lucidrains/PEER-pytorch), carried to the GPU
machine with the working tree (the device tool's carry: [".anchors"]); --anchors DIR points
elsewhere. Before importing them this script patches only that ignored copy (`setup` does it alone):
  - matmulfreellm: `tl.math.round(` -> `tl.extra.cuda.libdevice.round(` in its Triton kernels, which
    Triton 3.x needs (tl.math has no round there); left alone when the installed Triton has it;
  - PEER-pytorch imports einx, absent on the GPU machine: when `import einx` fails, a stand-in module
    with exactly the two einx.add patterns PEER.py calls is written to <anchors>/shim/einx.py and put
    on sys.path.

    python3 bench/anchors.py mmfreelm --config configs/mmf-370m.toml --batch 8,16 --seq 2048
    python3 bench/anchors.py peer --batch 4 --seq 2048
    python3 bench/anchors.py setup     # the patches alone (no torch needed)
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

ROUND_OLD, ROUND_NEW = "tl.math.round(", "tl.extra.cuda.libdevice.round("

EINX_STANDIN = '''"""A stand-in for einx, written by peerless' bench/anchors.py (einx is absent on the GPU machine):
exactly the einx.add patterns PEER_pytorch/PEER.py calls, nothing else."""


def add(pattern, a, b):
    if pattern == "... i, ... j -> ... (i j)":  # every sum a[..., i] + b[..., j], at index i * J + j
        return (a.unsqueeze(-1) + b.unsqueeze(-2)).flatten(-2)
    if pattern == "b n h k, h -> b n h k":  # an offset per head
        return a + b[:, None]
    raise NotImplementedError(f"einx stand-in: pattern {pattern!r} is not one PEER.py uses")
'''


# ---------------------------------------------------------------------------------------------
# The patches (the ignored copies only)


def snapshot(anchors, name):
    path = anchors / name
    if not path.is_dir():
        sys.exit(f"{path}: no snapshot. Copy {name} (git-ignored, never committed) to {anchors}/ and carry "
                 f"it to the GPU machine with the working tree (device tool: carry [\".anchors\"]).")
    return path


def triton_has_math_round():
    try:
        import triton.language as tl
    except ImportError:
        return None
    return hasattr(tl.math, "round")


def patch_mmfreelm(anchors, force=False):
    """tl.math.round( -> tl.extra.cuda.libdevice.round( in the snapshot's .py files, when Triton needs it."""
    root = snapshot(anchors, "matmulfreellm")
    has_round = triton_has_math_round()
    if has_round is not False and not force:
        why = "has tl.math.round" if has_round else "is not importable (--force patches anyway)"
        print(f"matmulfreellm: Triton {why}; {root} left as it is")
        return
    changed = []
    for py in sorted((root / "mmfreelm").rglob("*.py")):
        text = py.read_text()
        if ROUND_OLD in text:
            py.write_text(text.replace(ROUND_OLD, ROUND_NEW))
            changed.append(f"{py.relative_to(root)} ({text.count(ROUND_OLD)})")
    why = "Triton 3.x" if has_round is False else "--force"
    done = ", ".join(changed) if changed else "nothing (already patched)"
    print(f"matmulfreellm ({why}): {ROUND_OLD} -> {ROUND_NEW} in {done}")


def einx_path(anchors):
    """None when einx imports; else the folder holding the stand-in (written if missing)."""
    try:
        import einx  # noqa: F401
        return None
    except ImportError:
        pass
    shim = anchors / "shim"
    shim.mkdir(exist_ok=True)
    target = shim / "einx.py"
    if not target.exists() or target.read_text() != EINX_STANDIN:
        target.write_text(EINX_STANDIN)
        print(f"einx absent: stand-in written to {target}")
    return shim


# ---------------------------------------------------------------------------------------------
# Timing


def timed(step, warmup, steps):
    """Warm-up calls, then (seconds per call, the timed calls' results, peak allocated bytes)."""
    import torch
    first = step()
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = [step() for _ in range(steps)]
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, [first] + out, torch.cuda.max_memory_allocated()


def guarded(fn, rec):
    """Runs fn(); an out-of-memory or other failure becomes the record's status, not an exit."""
    import torch
    try:
        rec.update(fn())
        rec["status"] = "ok"
    except Exception as e:  # report and go on with the next configuration
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        rec.update(status="oom" if oom else "error", error=f"{type(e).__name__}: {text}")
    gc.collect()
    torch.cuda.empty_cache()
    print(json.dumps(rec), flush=True)
    return rec


def versions():
    import torch
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


# ---------------------------------------------------------------------------------------------
# ridgerchu/matmulfreellm


def run_mmfreelm(args):
    import torch
    from torch_mmf import bf16_peak_tflops, load_config  # bench/ is on sys.path as this script's folder
    cfg = load_config(args.config, args.set)
    m, o = cfg["model"], cfg["optim"]
    T = args.seq or cfg["data"]["seq_len"]
    patch_mmfreelm(args.anchors)
    sys.path.insert(0, str(snapshot(args.anchors, "matmulfreellm")))
    from mmfreelm.models import HGRNBitConfig, HGRNBitForCausalLM
    hf = HGRNBitConfig(vocab_size=m["vocab_size"], hidden_size=m["d_model"], num_hidden_layers=m["n_layers"],
                       intermediate_size=m["intermediate"], num_heads=1, expand_ratio=1, hidden_act="swish",
                       attn_mode="fused_recurrent", max_position_embeddings=T, rms_norm_eps=m["norm_eps"],
                       use_lower_bound=True, tie_word_embeddings=False, fuse_cross_entropy=True)
    dev = torch.device("cuda")
    peak = args.peak_tflops or bf16_peak_tflops(dev)
    print(f"mmfreelm: V {m['vocab_size']} d {m['d_model']} L {m['n_layers']} I {m['intermediate']} T {T}; "
          f"bf16 matmul peak {peak:.0f} TFLOP/s (8192^2)", flush=True)
    rows = []
    for B in args.batches:
        def one():
            torch.manual_seed(1234)
            with dev:  # parameters made and initialised on the GPU
                model = HGRNBitForCausalLM(hf).to(dev)
            model.train()
            n_params = sum(p.numel() for p in model.parameters())
            opt = torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                                    weight_decay=o["weight_decay"], fused=True)
            gen = torch.Generator(device=dev)
            gen.manual_seed(99)

            def step():
                ids = torch.randint(0, m["vocab_size"], (B, T), device=dev, generator=gen)
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss  # the model shifts the labels itself
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach()

            sec, losses, peak_bytes = timed(step, args.warmup, args.steps)
            tps = B * T / sec
            return {"params": n_params, "tokens_per_s": round(tps, 1), "ms_per_step": round(1e3 * sec, 2),
                    "mfu": round(6 * n_params * tps / (peak * 1e12), 4), "peak_tflops": round(peak, 1),
                    "peak_alloc_gib": round(peak_bytes / 2**30, 2), "loss_first": round(losses[0].item(), 4),
                    "loss_last": round(losses[-1].item(), 4)}

        rows.append(guarded(one, {"bench": "anchor_mmfreelm", "batch": B, "seq": T, "steps": args.steps,
                                  "warmup": args.warmup, **versions()}))
    print(f"\n{'batch':>5} {'seq':>5} {'tokens/s':>10} {'ms/step':>9} {'MFU':>6} {'alloc GiB':>9} {'loss':>15}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['batch']:>5} {r['seq']:>5} {r['status'].upper()}: {r['error'][:90]}")
            continue
        print(f"{r['batch']:>5} {r['seq']:>5} {r['tokens_per_s']:>10,.0f} {r['ms_per_step']:>9.1f} "
              f"{100 * r['mfu']:>5.1f}% {r['peak_alloc_gib']:>9.2f} {r['loss_first']:>7.3f}->{r['loss_last']:<7.3f}")


# ---------------------------------------------------------------------------------------------
# lucidrains/PEER-pytorch


def run_peer(args):
    import torch
    from torch import nn
    shim = einx_path(args.anchors)
    if shim:
        sys.path.insert(0, str(shim))
    sys.path.insert(0, str(snapshot(args.anchors, "PEER-pytorch")))
    from PEER_pytorch.PEER import PEER
    dev = torch.device("cuda")
    settings = {"dim": args.dim, "heads": args.heads, "num_experts": args.n_sub ** 2, "num_experts_per_head": args.k,
                "dim_key": args.key_dim // 2, "product_key_topk": args.k, "non_competing_scores": args.non_competing}
    print(f"PEER-pytorch: {settings}, ReLU experts, fp32, forward + backward of out.sum()", flush=True)
    rows = []
    for B in args.batches:
        tokens = B * args.seq

        def one():
            torch.manual_seed(1234)
            with dev:  # the 2 x 4 GiB expert tables made on the GPU, not on the host
                layer = PEER(**settings, activation=nn.ReLU).to(dev)
            x = torch.randn(B, args.seq, args.dim, device=dev, requires_grad=True)

            def step():
                layer(x).sum().backward()

            sec, _, peak_bytes = timed(step, args.warmup, args.steps)
            return {"tokens_per_s": round(tokens / sec, 1), "ms_per_iter": round(1e3 * sec, 2),
                    "peak_alloc_gib": round(peak_bytes / 2**30, 2)}

        rows.append(guarded(one, {"bench": "anchor_peer_pytorch", "batch": B, "seq": args.seq, "tokens": tokens,
                                  **settings, "steps": args.steps, "warmup": args.warmup, **versions()}))
    print(f"\n{'tokens':>7} {'tokens/s':>10} {'ms/iter':>9} {'alloc GiB':>9}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['tokens']:>7} {r['status'].upper()}: {r['error'][:90]}")
            continue
        print(f"{r['tokens']:>7} {r['tokens_per_s']:>10,.0f} {r['ms_per_iter']:>9.1f} {r['peak_alloc_gib']:>9.2f}")


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--anchors", type=Path, default=ROOT / ".anchors", help="snapshot folder (default <repo>/.anchors)")
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("setup", help="patch the ignored snapshots, nothing else")
    s.add_argument("--force", action="store_true", help="apply the Triton patch whatever Triton is installed")
    a = sub.add_parser("mmfreelm", help="train the reference MatMul-free LM")
    a.add_argument("--config", default=str(ROOT / "configs/mmf-370m.toml"), help="peerless TOML")
    a.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    a.add_argument("--seq", type=int, default=2048, help="T (default 2048)")
    a.add_argument("--batch", default="8,16", help="micro-batch sizes, comma-separated (default 8,16)")
    a.add_argument("--peak-tflops", type=float, default=None, help="skip the matmul probe, use this")
    p = sub.add_parser("peer", help="PEER-pytorch's layer forward + backward")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--n-sub", type=int, default=1024, help="sub-keys per half n; N = n^2 experts")
    p.add_argument("--k", type=int, default=16, help="experts per head")
    p.add_argument("--key-dim", type=int, default=512, help="query width per head, two sub-keys of half of it")
    p.add_argument("--non-competing", action="store_true", help="the library default: ReLU scores, top-1 per head")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", default="4", help="batch sizes, comma-separated (tokens = batch x seq; default 4)")
    for q in (a, p):
        q.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
        q.add_argument("--warmup", type=int, default=3, help="untimed steps first, >= 1 (default 3)")
    args = ap.parse_args()
    if args.what == "setup":
        patch_mmfreelm(args.anchors, force=args.force)
        snapshot(args.anchors, "PEER-pytorch")
        einx_path(args.anchors)
        return
    if args.warmup < 1 or args.steps < 1:
        sys.exit("--warmup and --steps must be >= 1")
    args.batches = [int(b) for b in args.batch.split(",") if b]
    import torch
    if not torch.cuda.is_available():
        sys.exit("bench/anchors.py times on a GPU: torch sees none")
    run_mmfreelm(args) if args.what == "mmfreelm" else run_peer(args)


if __name__ == "__main__":
    main()
