"""The anchor for `peerless bench attention`: PyTorch's scaled_dot_product_attention (causal, MHA) at
the same shapes, timed per SDPA backend (flash, cuDNN, efficient) in bf16 and, for the like-for-like
precision of our fp32 kernels, the efficient backend in fp32. TFLOP/s by the FlashAttention
convention (causal forward 2*B*H*T^2*d_h, fwd+bwd 3.5x); median of 10 after 3 warm-up runs.
Run on the GPU machine (its image has torch): python3 bench/attention_torch.py"""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F

SHAPES = [(8, 16, 2048, 64), (8, 16, 2048, 128), (4, 16, 4096, 128), (2, 16, 8192, 64), (2, 16, 8192, 128)]
RUNS = [("flash bf16", SDPBackend.FLASH_ATTENTION, torch.bfloat16),
        ("cuDNN bf16", SDPBackend.CUDNN_ATTENTION, torch.bfloat16),
        ("efficient fp32", SDPBackend.EFFICIENT_ATTENTION, torch.float32)]


def median_ms(fn, warmup=3, iters=10):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}: causal SDPA, TF/s fwd / fwd+bwd")
    print("| B, H, T, d_h | " + " | ".join(f"{n} fwd | {n} fwd+bwd" for n, _, _ in RUNS) + " |")
    print("|---|" + "---|" * (2 * len(RUNS)))
    for B, H, T, D in SHAPES:
        tf = 2 * B * H * T * T * D / 1e12
        cells = []
        for _, backend, dtype in RUNS:
            q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            do = torch.randn(B, H, T, D, device="cuda", dtype=dtype)
            try:
                with sdpa_kernel(backend):
                    fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    t_f = median_ms(fwd)
                    t_a = median_ms(lambda: fwd().backward(do))
                cells += [f"{tf / (t_f * 1e-3):.0f}", f"{3.5 * tf / (t_a * 1e-3):.0f}"]
            except RuntimeError as e:  # a backend that does not take this shape or dtype
                cells += ["n/a", "n/a"]
            del q, k, v, do
        print(f"| {B}, {H}, {T}, {D} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
