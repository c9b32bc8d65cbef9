#!/usr/bin/env python3
"""Checks of bench/torch_mmf.py's modules against their plain formulas (SPEC §1, §2), small random
inputs, mostly float64: quantizers (round half away from zero, codes), BitLinear forward
(a·tᵀ)·β/s and its straight-through backward, the chunked scan against the sequential definition
(fp32, with underflowing and near-1 gates) and its backward (gradcheck), the fused elementwise
autograd Functions (gradcheck), MLGRU and GLU against per-token loops, lower bounds, parameter
counts. Run: `python3 bench/torch_mmf.py --check` (or this file); CPU is enough.
"""

import math
import sys

import torch

from torch_mmf import (SPEC_370M_PARAMS, BitLinear, BitLinearFn, LinearScan, MatMulFreeLM, MLGRUGatesFn,
                       OutGateFn, RMSNormFn, SwiGLUFn, act_quant, bitlinear_ste, default_config,
                       param_count_formula, round_half_away, round_half_away_exact, scan_chunked, scan_sequential,
                       weight_quant)




def run_checks():
    torch.manual_seed(0)
    dt = torch.float64
    failures = []

    def report(name, err, tol):
        ok = err <= tol
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {err:.3g} (tol {tol:g})")
        if not ok:
            failures.append(name)

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    print("check: quantizers")
    v = torch.tensor([-2.5, -1.5, -0.5, -0.49999997, 0.0, 0.49999997, 0.5, 1.5, 2.5, 3.7, -3.7])
    want = torch.tensor([-3.0, -2.0, -1.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, -4.0])
    report("round_half_away on halves", (round_half_away(v) - want).abs().max().item(), 0.0)
    report("round_half_away on halves, float64", (round_half_away(v.double()) - want.double()).abs().max().item(), 0.0)
    # the fp32 fast form against the exact one: a stride through all fp32 with |v| < 256 (the codes
    # decide there), every half-integer below 2^16 and its neighbours (exhaustive: see round_half_away)
    bits = torch.arange(0, 0x43800000, 4099, dtype=torch.int64).to(torch.int32)
    v = torch.cat([bits.view(torch.float32), -bits.view(torch.float32)])
    k = torch.arange(0, 1 << 16, dtype=torch.float32) + 0.5
    k = k[k == k.floor() + 0.5]
    v = torch.cat([v, k, -k, torch.nextafter(k, torch.zeros_like(k)), torch.nextafter(k, k + 1)])
    report("fp32 fast round vs exact form", (round_half_away(v) != round_half_away_exact(v)).sum().item(), 0)
    x = torch.randn(7, 33, dtype=torch.float32) * 3
    x[2] = 0.0                                               # an all-zero row: s = 127/1e-5
    xq = act_quant(x)
    err = 0.0
    for r in range(x.shape[0]):
        s = float(torch.tensor(127.0) / torch.tensor(max(max(abs(float(e)) for e in x[r]), 1e-5)))
        for j in range(x.shape[1]):
            p = float(x[r, j] * torch.tensor(s))               # the fp32 product, as act_quant forms it
            a = math.copysign(math.floor(abs(p) + 0.5), p)
            a = min(max(a, -128.0), 127.0)
            err = max(err, abs(a / s - float(xq[r, j])) * s)
    report("act_quant vs per-element loop (in codes)", err, 1e-3)
    codes = (act_quant(x) * (127.0 / x.abs().amax(-1, keepdim=True).clamp_min(1e-5)))
    report("act_quant codes are integers", (codes - codes.round()).abs().max().item(), 1e-3)
    w = torch.randn(40, 24, dtype=dt) * 0.02
    beta = max(w.abs().mean().item(), 1e-5)
    t_ref = torch.tensor([[min(max(math.copysign(math.floor(abs(e / beta) + 0.5), e), -1), 1)
                           for e in row] for row in w.tolist()], dtype=dt)
    report("weight_quant vs t·β loop", (weight_quant(w) - t_ref * beta).abs().max().item(), 1e-15)

    print("check: BitLinear forward (a·tᵀ)·β/s and straight-through backward (SPEC §1)")
    K, N, M, eps = 48, 20, 9, 1e-6
    lin = BitLinear(K, N, eps).to(dt)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        lin.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(M, K, dtype=dt, requires_grad=True)
    y = lin(x)
    xhat = x.detach() * torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + eps)
    xt = xhat * lin.norm.weight.detach()
    s = 127.0 / xt.abs().amax(-1, keepdim=True).clamp_min(1e-5)
    a = round_half_away(xt * s).clamp(-128, 127)             # integer codes
    beta = lin.weight.detach().abs().mean().clamp_min(1e-5)
    t = round_half_away(lin.weight.detach() / beta).clamp(-1, 1)
    y_ref = (a @ t.T) * beta / s
    report("forward vs (a·tᵀ)·β/s", rel(y.detach(), y_ref), 1e-12)
    dy = torch.randn(M, N, dtype=dt)
    y.backward(dy)
    dyt = dy @ (t * beta)                                    # dỹ = dy·(tβ)
    g = lin.norm.weight.detach()
    rstd = torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + eps)
    dx_ref = rstd * (g * dyt - xhat * (xhat * g * dyt).mean(-1, keepdim=True))
    report("dx vs rstd·(γ⊙dỹ − x̂·mean(x̂⊙γ⊙dỹ))", rel(x.grad, dx_ref), 1e-12)
    report("dW vs dyᵀ·(a/s)", rel(lin.weight.grad, dy.T @ (a / s)), 1e-12)
    report("dγ vs Σ dỹ⊙x̂", rel(lin.norm.weight.grad, (dyt * xhat).sum(0)), 1e-12)
    xs = x.detach().clone().requires_grad_()
    gs = lin.norm.weight.detach().clone().requires_grad_()
    ws = lin.weight.detach().clone().requires_grad_()
    bitlinear_ste(xs, gs, ws, eps).backward(dy)
    report("dx vs the fake-quant (STE) autograd form", rel(x.grad, xs.grad), 1e-12)
    print("check: BitLinear under CPU bf16 autocast vs the STE form (loose: bf16 rounding)")
    lin32 = BitLinear(K, N, eps)
    lin32.compute_dtype = torch.bfloat16
    with torch.no_grad():
        lin32.weight.copy_(lin.weight)
        lin32.norm.weight.copy_(lin.norm.weight)
    xa = x.detach().float().clone().requires_grad_()
    xb = xa.detach().clone().requires_grad_()
    gb = lin32.norm.weight.detach().clone().requires_grad_()
    wb = lin32.weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = lin32(xa)
        yb = bitlinear_ste(xb, gb, wb, eps)
    report("dtype of the output is bf16", 0.0 if ya.dtype == yb.dtype == torch.bfloat16 else 1.0, 0.0)
    ya.float().backward(dy.float())
    yb.float().backward(dy.float())
    report("forward", rel(ya.float(), yb.float()), 1e-2)
    report("dx", rel(xa.grad, xb.grad), 2e-2)
    report("dW", rel(lin32.weight.grad, wb.grad), 2e-2)
    report("dγ", rel(lin32.norm.weight.grad, gb.grad), 2e-2)

    print("check: chunked scan vs the sequential definition (fp32)")
    for (B, T, D, C) in [(2, 64, 8, 16), (3, 50, 5, 16), (2, 2048, 4, 32), (1, 7, 3, 32), (2, 97, 6, 1)]:
        f = torch.rand(B, T, D)
        f[0, :, 0] = 1e-30                                   # products underflow to 0
        f[-1, :, -1] = 1 - 1e-7                              # near-1 gates: long memory
        f[:, T // 2, 1] = 0.0
        xs = torch.randn(B, T, D)
        hs = scan_sequential(f.double(), xs.double())
        report(f"forward B={B} T={T} D={D} chunk={C}", rel(scan_chunked(f, xs, C).double(), hs), 1e-5)
    B, T, D = 2, 45, 4
    f = (torch.rand(B, T, D, dtype=dt) * 0.9 + 0.05).requires_grad_()
    xs = torch.randn(B, T, D, dtype=dt, requires_grad=True)
    ok = torch.autograd.gradcheck(lambda f_, x_: LinearScan.apply(f_, x_, 8), (f, xs))
    report("LinearScan backward gradcheck (float64)", 0.0 if ok else 1.0, 0.0)
    f32 = torch.rand(B, 300, D)
    x32 = torch.randn(B, 300, D)
    fa, xa = f32.clone().requires_grad_(), x32.clone().requires_grad_()
    fb, xb = f32.double().requires_grad_(), x32.double().requires_grad_()
    dh = torch.randn(B, 300, D)
    LinearScan.apply(fa, xa, 32).backward(dh)
    scan_sequential(fb, xb).backward(dh.double())
    report("LinearScan backward fp32 vs autograd of the loop: df", rel(fa.grad.double(), fb.grad), 1e-5)
    report("LinearScan backward fp32 vs autograd of the loop: dx", rel(xa.grad.double(), xb.grad), 1e-5)

    print("check: fused elementwise Functions, gradcheck in float64")
    z = lambda *shape: torch.randn(*shape, dtype=dt, requires_grad=True)
    gain = (torch.rand(6, dtype=dt) + 0.5).requires_grad_()
    cases = [("RMSNormFn", lambda x_, g_: RMSNormFn.apply(x_, g_, 1e-6), (z(3, 4, 6), gain)),
             ("MLGRUGatesFn with lb", lambda a_, b_, l_: MLGRUGatesFn.apply(a_, b_, l_),
              (z(3, 4, 6), z(3, 4, 6), torch.rand(6, dtype=dt, requires_grad=True))),
             ("MLGRUGatesFn without lb", lambda a_, b_: MLGRUGatesFn.apply(a_, b_, None), (z(3, 4, 6), z(3, 4, 6))),
             ("OutGateFn", lambda g_, h_, w_: OutGateFn.apply(g_, h_, w_, 1e-6), (z(3, 4, 6), z(3, 4, 6), gain)),
             ("SwiGLUFn", SwiGLUFn.apply, (z(3, 4, 10),)),
             ("BitLinearFn (x, γ; quantized W held)", lambda x_, g_: BitLinearFn.apply(x_, g_, lin.weight, eps, None),
              (z(5, K), (torch.rand(K, dtype=dt) + 0.5).requires_grad_()))]
    for name, fn, inputs in cases:
        if name.startswith("BitLinearFn"):
            # the int8 codes are piecewise constant: the STE gradient is not their derivative, so
            # compare against the STE form instead of finite differences
            xa_, ga_ = inputs
            xb_, gb_ = xa_.detach().clone().requires_grad_(), ga_.detach().clone().requires_grad_()
            dy_ = torch.randn(5, N, dtype=dt)
            fn(xa_, ga_).backward(dy_)
            bitlinear_ste(xb_, gb_, lin.weight.detach(), eps).backward(dy_)
            report(name + " vs the STE form: dγ", rel(ga_.grad, gb_.grad), 1e-12)
            continue
        ok = torch.autograd.gradcheck(fn, inputs)
        report(name + " gradcheck", 0.0 if ok else 1.0, 0.0)

    print("check: MLGRU, GLU, lower bounds, model (float64)")
    m = default_config()["model"]
    m.update(vocab_size=50, d_model=16, n_layers=3, intermediate=32)
    model = MatMulFreeLM(m, chunk=8).to(dt)
    lb = model.lower_bound_table()
    report("lower bounds at init: lb_l = l/L", (lb - torch.arange(3, dtype=dt)[:, None] / 3).abs().max().item(), 1e-15)
    with torch.no_grad():
        model.lower_bounds.normal_(0, 1)
        for n_, p in model.named_parameters():
            if n_.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    lb = model.lower_bound_table().detach()
    P = torch.softmax(model.lower_bounds.detach(), 0)
    report("lower bounds: cumsum(softmax) − P_0", (lb[2] - P[1] - P[2]).abs().max().item(), 1e-15)
    mix = model.blocks[1].mixer
    x = torch.randn(2, 11, 16, dtype=dt)
    with torch.no_grad():
        out = mix(x, lb[1])
        i_hat, f_hat, g_hat = mix.i_proj(x), mix.f_proj(x), mix.g_proj(x)
        hs, h = [], torch.zeros(2, 16, dtype=dt)
        for t_ in range(11):
            f_t = lb[1] + (1 - lb[1]) * torch.sigmoid(f_hat[:, t_])
            i_t = i_hat[:, t_] * torch.sigmoid(i_hat[:, t_]) * (1 - f_t)
            h = f_t * h + i_t
            gn = g_hat[:, t_] / torch.sqrt(g_hat[:, t_].pow(2).mean(-1, keepdim=True) + 1e-6) * mix.g_norm.weight
            hs.append(gn * h / (1 + torch.exp(-h)))
        report("MLGRU vs per-token loop, o' = RMSNorm_g(ĝ)⊙h⊙σ(h)", rel(out, mix.o_proj(torch.stack(hs, 1))), 1e-12)
        glu = model.blocks[0].mlp
        au = glu.gate_proj(x)
        a_, u_ = au[..., :32], au[..., 32:]
        report("GLU vs down(SiLU(a)⊙u)", rel(glu(x), glu.down_proj(a_ * torch.sigmoid(a_) * u_)), 1e-12)
    n_model = sum(p.numel() for p in model.parameters())
    report("parameter count vs formula (tiny)", abs(n_model - param_count_formula(m)), 0)
    idx = torch.randint(0, 50, (2, 12))
    loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    report("lower-bound gradient flows (non-zero)", 0.0 if model.lower_bounds.grad.abs().sum() > 0 else 1.0, 0.0)
    m370 = default_config()["model"]
    m370["intermediate"] = 256 * math.ceil(int(8 * 1024 / 3) / 256)
    report("370M: I = 2816", abs(m370["intermediate"] - 2816), 0)
    report("370M parameter count formula = 374,108,160", abs(param_count_formula(m370) - SPEC_370M_PARAMS), 0)
    print("check:", "all passed" if not failures else f"{len(failures)} FAILED: {failures}")
    return not failures


if __name__ == "__main__":
    sys.exit(0 if run_checks() else 1)
