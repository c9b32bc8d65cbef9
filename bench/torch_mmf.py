#!/usr/bin/env python3
"""PyTorch baseline of the MatMul-free LM (SPEC §1, §2 code form) for `peerless bench train`.

The in-repo baseline that peerless' CUDA training step is measured against: the same model,
initialisation and optimizer written in plain PyTorch, trained on random token batches in eager
mode and under `torch.compile`, reporting tokens/s, MFU against a measured bf16 matmul peak and
peak memory, one JSON line per (mode, batch) plus a table. Fake-quant BitLinear with
straight-through estimators, as the reference implementation (ridgerchu/matmulfreellm) does:
its forward uses the quantized values, its backward is the identity through both quantizers.

Run (GPU machine: PyTorch 2.x with Triton):
    python3 bench/torch_mmf.py --config configs/mmf-370m.toml --batch 4,8,16 --modes eager,compile \
        --steps 10 --warmup 3
    python3 bench/torch_mmf.py --check            # modules against their plain formulas (CPU is fine)
    # small CPU smoke run, learning one fixed batch (the loss must fall):
    python3 bench/torch_mmf.py --config configs/mmf-370m.toml --set model.d_model=64 \
        --set model.n_layers=2 --set model.intermediate=0 --set model.vocab_size=256 --seq-len 64 \
        --batch 2 --modes eager --steps 30 --warmup 1 --fixed-batch --set optim.lr=3e-3 --device cpu
Config: the repo's TOML ([model], [data].seq_len, [optim]); `--set section.key=value` overrides.
Compile mode compiles each block (`--compile-scope block`, the default: one graph reused by all
layers, ~100 s per batch size on the H100 machine); `--compile-scope model` is torch.compile(model),
which did not finish compiling the 24-layer model within 390 s there. docs/torch_baseline.md has
the measured figures.

The scan h_t = f_t ⊙ h_{t−1} + i_t is a custom autograd.Function (backward per SPEC §2:
dh_t = do_t + f_{t+1} dh_{t+1}, di = dh, df = dh ⊙ h_{t−1}), so autograd keeps only f and h.
It is chunked (chunks of C = 32 by default): within a chunk a sequential loop of C fused
multiply-adds over all chunks at once plus torch.cumprod of f; across chunks a Hillis–Steele scan
(log2(T/C) levels) of the per-chunk (Πf, end state) pairs; then h = local + cumprod ⊙ carry. Only
products of f ∈ (0, 1) are formed (they underflow gracefully to 0) and nothing is divided by a
cumulative product, so it is stable for any f; it is plain tensor code, so it runs unchanged in
eager and under torch.compile (where the loop unrolls into C fused ops). A sequential loop over
T = 2048 would cost ~2048 × 3 launches per scan in eager. torch._higher_order_ops.associative_scan
was not used: its pointwise mode needs compile, the generic eager mode is a slow recursive
slicing scan, and its autograd has changed between releases.
"""

import argparse
import gc
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import tomllib
except ImportError:  # Python < 3.11 (the local Debian 12 machine has 3.11; keep a clear message)
    tomllib = None

SPEC_370M_PARAMS = 374_108_160


# ---------------------------------------------------------------------------------------------
# Config


def default_config():
    return {
        "model": {"vocab_size": 32000, "d_model": 1024, "n_layers": 24, "intermediate": 0,
                  "norm_eps": 1e-6, "init_std": 0.02, "gate_form": "code"},
        "data": {"seq_len": 2048},
        "optim": {"lr": 1.5e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8},
    }


def parse_value(text):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def load_config(path, overrides):
    cfg = default_config()
    if path:
        if tomllib is None:
            sys.exit("reading a TOML config needs Python 3.11+ (tomllib)")
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
        for section in cfg:
            for key, value in raw.get(section, {}).items():
                if key in cfg[section]:
                    cfg[section][key] = value
    errors = []
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            errors.append(f"--set wants section.key=value (got {item!r})")
            continue
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        if section not in cfg or name not in cfg[section]:
            errors.append(f"unknown config key {key!r} (known: " +
                          ", ".join(f"{s}.{k}" for s in cfg for k in cfg[s]) + ")")
            continue
        cfg[section][name] = parse_value(value)
    m = cfg["model"]
    if m["intermediate"] == 0:
        m["intermediate"] = 256 * math.ceil(int(8 * m["d_model"] / 3) / 256)
    if m["gate_form"] not in ("code", "paper"):
        errors.append(f"model.gate_form must be code or paper (got {m['gate_form']!r})")
    for key in ("vocab_size", "d_model", "n_layers", "intermediate"):
        if not (isinstance(m[key], int) and m[key] > 0):
            errors.append(f"model.{key} must be a positive integer (got {m[key]!r})")
    if errors:
        sys.exit("config errors:\n  " + "\n  ".join(errors))
    return cfg


def param_count_formula(m):
    """SPEC §2 parameter count: embedding + lm_head + per layer (i, f, g, o, gate 2I, down) weights,
    their RMSNorm gains, the two block norms, g_norm (code form), lower bounds, final norm."""
    V, d, L, I = m["vocab_size"], m["d_model"], m["n_layers"], m["intermediate"]
    g_norm = d if m["gate_form"] == "code" else 0
    per_layer = 4 * d * d + 2 * I * d + I * d + 4 * d + d + I + 2 * d + g_norm
    return 2 * V * d + L * per_layer + L * d + d + d


# ---------------------------------------------------------------------------------------------
# Quantizers (SPEC §1)


_JUST_BELOW_HALF = 0.49999997  # nextafter(0.5, 0) in fp32


def round_half_away(v):
    """Round half away from zero (torch.round rounds half to even), fp32: trunc(v ± (0.5 − ulp)).
    Adding 0.5 itself fails at 0.49999997 (the sum rounds up to 1); adding nextafter(0.5, 0)
    agrees with the exact form trunc(v) + sign(v)·[|v − trunc(v)| ≥ 0.5] on all 2,516,582,400 fp32
    with |v| < 2^23 (checked exhaustively; above that both return v). Other dtypes: the exact form."""
    if v.dtype == torch.float32:
        return torch.trunc(torch.add(v, torch.sign(v), alpha=_JUST_BELOW_HALF))  # ±c·1 is exact
    return round_half_away_exact(v)


def round_half_away_exact(v):
    r = torch.trunc(v)                                       # v − trunc(v) is exact
    return r + torch.sign(v) * ((v - r).abs() >= 0.5).to(v.dtype)


def act_quant(x):
    """Per-token int8: s = 127 / max(max|x|, 1e-5); codes clamp(round(x·s), −128, 127); value a/s."""
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
    return round_half_away(x * s).clamp(-128, 127) / s


def weight_quant(w):
    """Per-tensor ternary: β = max(mean|W|, 1e-5); codes clamp(round(W/β), −1, 1); value t·β."""
    beta = w.abs().mean().clamp_min(1e-5)
    return round_half_away(w / beta).clamp(-1, 1) * beta


def up(x):
    """At least fp32: bf16/fp16 (autocast outputs) to fp32, fp32 and fp64 unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def rms_norm(x, gain, eps):
    x = up(x)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def rms_norm_backward(dy, xhat, rstd, gain):
    """dγ = Σ dy⊙x̂, dx = rstd·(γ⊙dy − x̂·mean(x̂⊙γ⊙dy)) (rows over the last dim)."""
    gd = dy * gain
    dx = rstd * (gd - xhat * (xhat * gd).mean(-1, keepdim=True))
    return dx, (dy * xhat).reshape(-1, xhat.shape[-1]).sum(0)


# Eager autograd would keep three or four fp32 copies per elementwise chain (x, x·rstd, σ(z), ...);
# the Functions below save their inputs only and recompute the rest in the backward, as the
# reference's fused Triton kernels do, which keeps eager memory near the reference's. They are
# plain tensor code, so torch.compile traces and fuses them too.


class RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gain, eps):
        xf = up(x)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, gain)
        return xf * rstd * gain

    @staticmethod
    def backward(ctx, dy):
        x, rstd, gain = ctx.saved_tensors
        dx, dgain = rms_norm_backward(up(dy), up(x) * rstd, rstd, gain)
        return dx.to(x.dtype), dgain.to(gain.dtype), None


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x):
        return RMSNormFn.apply(x, self.weight, self.eps)


def silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


class MLGRUGatesFn(torch.autograd.Function):
    """f = lb + (1 − lb)·σ(f̂) (f = σ(f̂) without lb), i = SiLU(î)·(1 − f); returns (f, i) at
    least fp32. Saves î, f̂ (bf16 under autocast) and lb."""

    @staticmethod
    def forward(ctx, i_hat, f_hat, lb):
        f0 = torch.sigmoid(up(f_hat))
        f = f0 if lb is None else lb + (1 - lb) * f0
        i = F.silu(up(i_hat)) * (1 - f)
        ctx.save_for_backward(i_hat, f_hat, lb)
        ctx.has_lb = lb is not None
        return f, i

    @staticmethod
    def backward(ctx, df, di):
        i_hat, f_hat, lb = ctx.saved_tensors
        zi, zf = up(i_hat), up(f_hat)
        f0 = torch.sigmoid(zf)
        f = f0 if not ctx.has_lb else lb + (1 - lb) * f0
        dft = df - di * F.silu(zi)                           # total gradient of f
        di_hat = di * (1 - f) * silu_grad(zi)
        df0 = dft if not ctx.has_lb else dft * (1 - lb)
        df_hat = df0 * f0 * (1 - f0)
        dlb = None
        if ctx.has_lb:
            dlb = (dft * (1 - f0)).reshape(-1, zf.shape[-1]).sum(0).to(lb.dtype)
        return di_hat.to(i_hat.dtype), df_hat.to(f_hat.dtype), dlb


class OutGateFn(torch.autograd.Function):
    """Code form o' = RMSNorm_g(ĝ) ⊙ h ⊙ σ(h) (fp32). Saves ĝ, h (kept by the scan anyway), γ, rstd."""

    @staticmethod
    def forward(ctx, g_hat, h, gain, eps):
        zg = up(g_hat)
        rstd = torch.rsqrt(zg.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(g_hat, h, gain, rstd)
        return zg * rstd * gain * (h * torch.sigmoid(h))

    @staticmethod
    def backward(ctx, do):
        g_hat, h, gain, rstd = ctx.saved_tensors
        ghat = up(g_hat) * rstd                              # x̂ of the g norm
        s = torch.sigmoid(h)
        dn = do * h * s                                      # gradient of RMSNorm_g(ĝ)
        dh = do * ghat * gain * (s * (1 + h * (1 - s)))
        dg, dgain = rms_norm_backward(dn, ghat, rstd, gain)
        return dg.to(g_hat.dtype), dh, dgain.to(gain.dtype), None


class SwiGLUFn(torch.autograd.Function):
    """[a | u] → SiLU(a)⊙u in the input's dtype; saves [a | u] only."""

    @staticmethod
    def forward(ctx, au):
        a, u = au.chunk(2, dim=-1)
        ctx.save_for_backward(au)
        return (F.silu(up(a)) * up(u)).to(au.dtype)

    @staticmethod
    def backward(ctx, dz):
        (au,) = ctx.saved_tensors
        a, u = up(au).chunk(2, dim=-1)
        dz = up(dz)
        return torch.cat([dz * u * silu_grad(a), dz * F.silu(a)], -1).to(au.dtype)


def bitlinear_ste(x, gain, weight, eps):
    """The reference's fake-quant form: q = v + (quant(v) − v).detach(), so the forward sees quant(v)
    and the backward the identity through both quantizers. Autograd then keeps the normalised input
    in fp32 and its bf16 copy for every projection; kept for --check (BitLinearFn must agree)."""
    xn = rms_norm(x, gain, eps)                              # (..., K)
    xd = xn.detach()
    xq = xn + (act_quant(xd) - xd)                           # value a/s
    wd = weight.detach()
    wq = weight + (weight_quant(wd) - wd)                    # value t·β
    return F.linear(xq, wq)


class BitLinearFn(torch.autograd.Function):
    """BitLinear with the SPEC §1 backward written out: saves only the input x (as it came, often a
    tensor saved anyway), rstd and the ternary weights in the compute dtype, and recomputes x̂ and
    the int8 activations in the backward (as the reference's fused norm+quant+linear kernel does).
    Forward y = (a/s)·(tβ)ᵀ in `cdtype` (bf16 under autocast: a/s and tβ rounded to bf16, as the
    reference's autocast matmul does). Backward: dỹ = dy·(tβ), dW = dyᵀ·(a/s),
    dγ = Σ dỹ⊙x̂, dx = rstd·(γ⊙dỹ − x̂·mean(x̂⊙γ⊙dỹ))."""

    @staticmethod
    def forward(ctx, x, gain, weight, eps, cdtype):
        xf = up(x)                                           # (..., K) at least fp32
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)   # (..., 1)
        cd = cdtype or xf.dtype
        xq = act_quant(xf * rstd * gain).to(cd)
        wq = weight_quant(weight).to(cd)                     # (N, K)
        ctx.save_for_backward(x, rstd, gain, wq)
        ctx.cd = cd
        ctx.wdtype = weight.dtype
        return F.linear(xq, wq)                              # (..., N) in cd

    @staticmethod
    def backward(ctx, dy):
        x, rstd, gain, wq = ctx.saved_tensors
        K, N = x.shape[-1], wq.shape[0]
        xhat = up(x) * rstd
        xq = act_quant(xhat * gain).to(ctx.cd)
        dy = dy.to(ctx.cd)
        dxt = (dy @ wq).to(xhat.dtype)                       # dỹ (..., K)
        dw = dy.reshape(-1, N).t() @ xq.reshape(-1, K)       # (N, K)
        dgain = (dxt * xhat).reshape(-1, K).sum(0)
        gd = dxt * gain
        dx = rstd * (gd - xhat * (xhat * gd).mean(-1, keepdim=True))
        return dx.to(x.dtype), dgain.to(gain.dtype), dw.to(ctx.wdtype), None, None


class BitLinear(nn.Module):
    """RMSNorm (own gain γ) → per-token int8 activations × per-tensor ternary weights, no bias."""

    def __init__(self, in_features, out_features, eps, device=None):
        super().__init__()
        self.eps = eps
        self.norm = RMSNorm(in_features, eps, device)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device))
        self.compute_dtype = None                            # bf16 under autocast (MatMulFreeLM.set_compute_dtype)

    def forward(self, x):
        return BitLinearFn.apply(x, self.norm.weight, self.weight, self.eps, self.compute_dtype)


# ---------------------------------------------------------------------------------------------
# The scan h_t = f_t ⊙ h_{t−1} + x_t (state in fp32)


def _scan_pairs_hillis_steele(a, b):
    """Inclusive scan over dim 1 of the pairs (a, b) under (a1, b1)∘(a2, b2) = (a1·a2, a2·b1 + b2).
    a, b: (B, n, D). log2(n) levels; used across chunks where n = T / C is small."""
    n = a.shape[1]
    s = 1
    while s < n:
        b = torch.cat([b[:, :s], torch.addcmul(b[:, s:], a[:, s:], b[:, :-s])], 1)
        a = torch.cat([a[:, :s], a[:, s:] * a[:, :-s]], 1)
        s *= 2
    return b


def scan_chunked(f, x, chunk):
    """h_t = f_t ⊙ h_{t−1} + x_t, h_{−1} = 0, along dim 1. f, x: (B, T, D) fp32 → h (B, T, D)."""
    B, T, D = x.shape
    C = min(chunk, T)
    n = -(-T // C)
    pad = n * C - T
    if pad:  # trailing padding cannot affect earlier outputs
        f = F.pad(f, (0, 0, 0, pad), value=1.0)
        x = F.pad(x, (0, 0, 0, pad))
    fc = f.contiguous().view(B, n, C, D)
    xc = x.contiguous().view(B, n, C, D)
    cols = [xc[:, :, 0]]                                     # each (B, n, D): every chunk at once
    for t in range(1, C):
        cols.append(torch.addcmul(xc[:, :, t], fc[:, :, t], cols[-1]))
    local = torch.stack(cols, 2)                             # (B, n, C, D) scan from a zero state
    decay = torch.cumprod(fc, 2)                             # (B, n, C, D) Π f within the chunk
    ends = _scan_pairs_hillis_steele(decay[:, :, -1], local[:, :, -1])   # (B, n, D) state after chunk c
    carry_in = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], 1)  # (B, n, D) state entering c
    h = torch.addcmul(local, decay, carry_in.unsqueeze(2))
    return h.view(B, n * C, D)[:, :T]


def scan_sequential(f, x):
    """The definition, one step at a time (for --check)."""
    h = torch.zeros_like(x[:, 0])
    out = []
    for t in range(x.shape[1]):
        h = f[:, t] * h + x[:, t]
        out.append(h)
    return torch.stack(out, 1)


class LinearScan(torch.autograd.Function):
    """Forward scan_chunked; backward (SPEC §2) dh_t = dh_out_t + f_{t+1} dh_{t+1} (a reverse scan
    with the coefficients shifted by one), dx = dh, df = dh ⊙ h_{t−1}. Saves only f and h."""

    @staticmethod
    def forward(ctx, f, x, chunk):
        h = scan_chunked(f, x, chunk)
        ctx.save_for_backward(f, h)
        ctx.chunk = chunk
        return h

    @staticmethod
    def backward(ctx, dh_out):
        f, h = ctx.saved_tensors
        # coefficient at t is f_{t+1}; the last one multiplies the zero state past the end
        g = torch.cat([f[:, 1:], torch.ones_like(f[:, :1])], 1)
        dh = scan_chunked(g.flip(1), up(dh_out).flip(1), ctx.chunk).flip(1)
        h_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
        return dh * h_prev, dh, None


def linear_scan(f, x, chunk=32):
    return LinearScan.apply(up(f), up(x), chunk)


# ---------------------------------------------------------------------------------------------
# Model (SPEC §2)


class MLGRU(nn.Module):
    def __init__(self, d, eps, gate_form, chunk, device=None):
        super().__init__()
        self.i_proj = BitLinear(d, d, eps, device)
        self.f_proj = BitLinear(d, d, eps, device)
        self.g_proj = BitLinear(d, d, eps, device)
        self.o_proj = BitLinear(d, d, eps, device)
        self.gate_form = gate_form
        self.chunk = chunk
        if gate_form == "code":
            self.g_norm = RMSNorm(d, eps, device)

    def forward(self, x, lower_bound=None):
        # x: (B, T, d); lower_bound: (d) or None for layer 0
        i_hat, f_hat, g_hat = self.i_proj(x), self.f_proj(x), self.g_proj(x)   # (B, T, d) bf16
        f, i = MLGRUGatesFn.apply(i_hat, f_hat, lower_bound)  # (B, T, d) fp32 each
        h = linear_scan(f, i, self.chunk)                    # (B, T, d) fp32
        if self.gate_form == "code":
            o = OutGateFn.apply(g_hat, h, self.g_norm.weight, self.g_norm.eps)
        else:
            o = torch.sigmoid(up(g_hat)) * h
        return self.o_proj(o)


class GLU(nn.Module):
    def __init__(self, d, inter, eps, device=None):
        super().__init__()
        self.gate_proj = BitLinear(d, 2 * inter, eps, device)   # fused [gate | up]: one γ, one β
        self.down_proj = BitLinear(inter, d, eps, device)

    def forward(self, x):
        return self.down_proj(SwiGLUFn.apply(self.gate_proj(x)))


class Block(nn.Module):
    def __init__(self, m, chunk, device=None):
        super().__init__()
        d, eps = m["d_model"], m["norm_eps"]
        self.mixer_norm = RMSNorm(d, eps, device)
        self.mixer = MLGRU(d, eps, m["gate_form"], chunk, device)
        self.mlp_norm = RMSNorm(d, eps, device)
        self.mlp = GLU(d, m["intermediate"], eps, device)

    def forward(self, x, lower_bound=None):
        x = x + self.mixer(self.mixer_norm(x), lower_bound)  # residual stream fp32
        return x + self.mlp(self.mlp_norm(x))


class MatMulFreeLM(nn.Module):
    def __init__(self, m, chunk=32, device=None):
        super().__init__()
        V, d, L = m["vocab_size"], m["d_model"], m["n_layers"]
        self.embed = nn.Embedding(V, d, device=device)
        self.blocks = nn.ModuleList(Block(m, chunk, device) for _ in range(L))
        self.lower_bounds = nn.Parameter(torch.zeros(L, d, device=device))   # P_raw
        self.final_norm = RMSNorm(d, m["norm_eps"], device)
        self.lm_head = BitLinear(d, V, m["norm_eps"], device)
        self.init_weights(m)

    @torch.no_grad()
    def init_weights(self, m):
        std, L = m["init_std"], m["n_layers"]
        nn.init.normal_(self.embed.weight, 0.0, std)
        nn.init.normal_(self.lm_head.weight, 0.0, std)
        for blk in self.blocks:
            for p in (blk.mixer.i_proj, blk.mixer.f_proj, blk.mixer.g_proj, blk.mixer.o_proj):
                nn.init.xavier_uniform_(p.weight, gain=2 ** -2.5)
            nn.init.normal_(blk.mlp.gate_proj.weight, 0.0, std)
            nn.init.normal_(blk.mlp.down_proj.weight, 0.0, std / math.sqrt(2 * L))
        # gains are ones and lower bounds zeros from construction

    def set_compute_dtype(self, dtype):
        """The matmul dtype of every BitLinear: torch.bfloat16 when training under bf16 autocast,
        None for the input's own dtype."""
        for mod in self.modules():
            if isinstance(mod, BitLinear):
                mod.compute_dtype = dtype

    def lower_bound_table(self):
        """lb = cumsum(softmax_L(P_raw)) − P_0: (L, d), lb_0 = 0, lb_l = l/L at init."""
        p = torch.softmax(self.lower_bounds, dim=0)
        return torch.cumsum(p, dim=0) - p[0]

    def forward(self, idx, targets):
        # idx, targets: (B, T) int64
        x = self.embed(idx)                                  # (B, T, d) fp32
        lb = self.lower_bound_table()
        for l, blk in enumerate(self.blocks):
            x = blk(x, lb[l] if l > 0 else None)
        logits = self.lm_head(self.final_norm(x))            # (B, T, V)
        return F.cross_entropy(up(logits.reshape(-1, logits.shape[-1])), targets.reshape(-1))


def param_groups(model, weight_decay):
    """Weight decay on BitLinear weights only (peerless' defaults: no decay on the embedding, the
    gains, the lower bounds)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if name.endswith("proj.weight") or name == "lm_head.weight" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------
# Benchmark


def bf16_peak_tflops(device, n=8192, reps=5, inner=10):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / inner)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 / best / 1e12


def run_one(cfg, args, mode, batch, device, n_params, peak_tflops):
    m, o = cfg["model"], cfg["optim"]
    T = cfg["data"]["seq_len"]
    torch.manual_seed(1234)
    model = MatMulFreeLM(m, chunk=args.chunk, device=device)
    opt = torch.optim.AdamW(param_groups(model, o["weight_decay"]), lr=o["lr"],
                            betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                            **({"fused": True} if device.type == "cuda" else {}))
    fwd = model
    if mode == "compile":
        torch._dynamo.reset()
        if args.compile_scope == "model":
            fwd = torch.compile(model, dynamic=False)
        else:  # regional: one compiled block reused by every layer, far less compile time
            for l, blk in enumerate(model.blocks):
                model.blocks[l] = torch.compile(blk, dynamic=False)
    use_amp = args.autocast == "bf16"
    model.set_compute_dtype(torch.bfloat16 if use_amp else None)
    gen = torch.Generator(device=device)
    gen.manual_seed(99)
    fixed = torch.randint(0, m["vocab_size"], (batch, T + 1), device=device, generator=gen)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        tok = fixed if args.fixed_batch else torch.randint(0, m["vocab_size"], (batch, T + 1),
                                                           device=device, generator=gen)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = fwd(tok[:, :-1], tok[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    sync()
    t0 = time.perf_counter()
    first_loss = step().item()
    first_step_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    sync()
    elapsed = time.perf_counter() - t0
    losses = torch.stack(losses).float().cpu().tolist()
    tok_s = args.steps * batch * T / elapsed
    rec = {"bench": "torch_mmf", "status": "ok", "mode": mode, "batch": batch, "seq_len": T,
           "steps": args.steps, "warmup": args.warmup, "params": n_params,
           **({"compile_scope": args.compile_scope} if mode == "compile" else {}),
           "tokens_per_s": round(tok_s, 1), "ms_per_step": round(1e3 * elapsed / args.steps, 2),
           "first_step_s": round(first_step_s, 2), "loss_first": round(first_loss, 4),
           "loss_last": round(losses[-1], 4), "loss_min": round(min(losses), 4)}
    if peak_tflops:
        rec["model_tflops"] = round(6 * n_params * tok_s / 1e12, 1)
        rec["mfu"] = round(6 * n_params * tok_s / (peak_tflops * 1e12), 4)
    if device.type == "cuda":
        rec["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2 ** 30, 2)
    if args.verbose_losses:
        rec["losses"] = [round(v, 4) for v in losses]
    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            sync()
        print(f"profile: {mode} batch {batch}, 2 steps, CUDA kernels by total time")
        avg = prof.key_averages()
        key = "self_device_time_total" if hasattr(avg[0], "self_device_time_total") else "self_cuda_time_total"
        print(avg.table(sort_by=key, row_limit=args.profile, max_name_column_width=90), flush=True)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="peerless TOML (configs/mmf-370m.toml)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--seq-len", type=int, default=None, help="override data.seq_len")
    ap.add_argument("--batch", default="4,8,16", help="comma-separated micro-batch sizes")
    ap.add_argument("--modes", default="eager,compile", help="eager,compile")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1; compile happens here)")
    ap.add_argument("--compile-scope", choices=["model", "block"], default="block",
                    help="torch.compile each block (one graph reused by every layer; ~100 s to compile "
                         "on the H100 machine) or the whole model (24 layers unrolled: did not finish "
                         "compiling in 390 s there)")
    ap.add_argument("--chunk", type=int, default=32, help="scan chunk length C")
    ap.add_argument("--autocast", choices=["bf16", "none"], default="bf16")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--peak-tflops", type=float, default=None, help="skip the matmul probe, use this")
    ap.add_argument("--fixed-batch", action="store_true", help="train on one batch (loss must fall)")
    ap.add_argument("--verbose-losses", action="store_true", help="every timed step's loss in the JSON")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="after timing, profile 2 steps and print the top ROWS CUDA kernels")
    ap.add_argument("--check", action="store_true", help="check modules against plain formulas, exit")
    args = ap.parse_args()

    if args.check:
        from torch_mmf_check import run_checks   # bench/ is on sys.path as the script's folder
        sys.exit(0 if run_checks() else 1)
    if args.warmup < 1 or args.steps < 1:
        sys.exit("--warmup and --steps must be >= 1")
    cfg = load_config(args.config, args.set)
    if args.seq_len:
        cfg["data"]["seq_len"] = args.seq_len
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batches = [int(b) for b in args.batch.split(",") if b]
    modes = [s for s in args.modes.split(",") if s]
    for mode in modes:
        if mode not in ("eager", "compile"):
            sys.exit(f"--modes: unknown mode {mode!r} (eager, compile)")

    m = cfg["model"]
    counted = MatMulFreeLM(m, chunk=args.chunk, device="meta")   # no memory: shapes only
    n_params = sum(p.numel() for p in counted.parameters())
    del counted
    print(f"model: V={m['vocab_size']} d={m['d_model']} L={m['n_layers']} I={m['intermediate']} "
          f"gate={m['gate_form']} T={cfg['data']['seq_len']}  params {n_params:,} "
          f"(formula {param_count_formula(m):,})")
    assert n_params == param_count_formula(m), "parameter count differs from the SPEC formula"
    if (m["vocab_size"], m["d_model"], m["n_layers"], m["intermediate"], m["gate_form"]) == \
            (32000, 1024, 24, 2816, "code"):
        assert n_params == SPEC_370M_PARAMS, f"370M config must have {SPEC_370M_PARAMS:,} parameters"

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = bf16_peak_tflops(device)
        print(f"bf16 dense peak (8192^3 matmul, best of 5x10): {peak:.1f} TFLOP/s")
    print(f"torch {torch.__version__}, device {dev_name}, autocast {args.autocast}, "
          f"steps {args.steps} (+{args.warmup} warm-up), chunk {args.chunk}", flush=True)

    rows = []
    for mode in modes:
        if mode == "compile" and not hasattr(torch, "compile"):
            rec = {"bench": "torch_mmf", "status": "error", "mode": mode,
                   "error": f"torch {torch.__version__} has no torch.compile"}
            print(json.dumps(rec), flush=True)
            rows.append(rec)
            continue
        for batch in batches:
            try:
                rec = run_one(cfg, args, mode, batch, device, n_params, peak)
            except Exception as e:  # report (out of memory or another failure) and continue
                oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)
                rec = {"status": "oom" if oom else "error",
                       "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"}
            if mode == "compile":
                torch._dynamo.reset()                        # drop compiled graphs holding the old model
            if rec["status"] != "ok":
                rec = {"bench": "torch_mmf", "mode": mode, "batch": batch, **rec}
            rec.update(torch=torch.__version__, device=dev_name)
            if peak:
                rec["peak_tflops"] = round(peak, 1)
            print(json.dumps(rec), flush=True)
            rows.append(rec)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print()
    print(f"{'mode':8} {'batch':>5} {'tok/s':>10} {'ms/step':>9} {'MFU':>6} {'alloc GiB':>9} "
          f"{'resv GiB':>9} {'1st step s':>10} {'loss':>13}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['mode']:8} {r.get('batch', ''):>5} {r['status'].upper()}: {r['error'][:90]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"{r['mode']:8} {r['batch']:>5} {r['tokens_per_s']:>10,.0f} {r['ms_per_step']:>9.1f} {mfu:>6} "
              f"{r.get('peak_alloc_gib', 0):>9.2f} {r.get('peak_reserved_gib', 0):>9.2f} "
              f"{r['first_step_s']:>10.1f} {r['loss_first']:>6.3f}→{r['loss_last']:<6.3f}")


if __name__ == "__main__":
    main()
