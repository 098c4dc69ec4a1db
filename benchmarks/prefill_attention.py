"""Prefill attention kernels PyTorch ships, on a full-size prefill step (GPU only): FlashAttention-2 varlen (what
the `torch_flash` kernel calls) against cuDNN's fused attention, same inputs, outputs compared.

    python benchmarks/prefill_attention.py [--seqs 16 --len 1024 --heads 16 --kv-heads 8 --head-dim 128]
"""
import argparse

import torch


def timed(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1000  # us


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--len", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    n, L, H, K, D = args.seqs, args.len, args.heads, args.kv_heads, args.head_dim
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(n * L, H, D, device=dev, dtype=dt)
    k = torch.randn(n * L, K, D, device=dev, dtype=dt)
    v = torch.randn(n * L, K, D, device=dev, dtype=dt)
    cu = torch.arange(0, n * L + 1, L, device=dev, dtype=torch.int32)
    scale = D ** -0.5
    flops = 4 * n * L * L / 2 * H * D  # causal: half of QK^T and PV
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; {n} x {L} tokens, {H}/{K} heads, dim {D}")

    def fa2():
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, L, L, 0.0, True, False, scale=scale)[0]
    ref = fa2()
    us = timed(fa2)
    print(f"flash-attention-2 varlen: {us:8.1f} us  {flops / us / 1e6:6.1f} TFLOP/s")
    kr, vr = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    candidates = {
        "cudnn varlen, GQA": lambda: torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu, cu, L, L, False, 0.0, True, False, scale=scale)[0],
        "cudnn varlen, heads repeated": lambda: torch.ops.aten._cudnn_attention_forward(
            q, kr, vr, None, cu, cu, L, L, False, 0.0, True, False, scale=scale)[0],
        "cudnn batched [n, H, L, D], heads repeated": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
            q.view(n, L, H, D).transpose(1, 2), kr.view(n, L, H, D).transpose(1, 2), vr.view(n, L, H, D).transpose(1, 2),
            None, False, 0.0, True, False, scale=scale)[0].transpose(1, 2).reshape(n * L, H, D),
    }
    for name, fn in candidates.items():
        try:
            out = fn()
            err = (out.float() - ref.float()).abs().max().item()
            us = timed(fn)
            print(f"{name}: {us:8.1f} us  {flops / us / 1e6:6.1f} TFLOP/s  max |diff| vs FA2 {err:.2e}")
        except Exception as e:  # report and go on: this is a survey of what the installed PyTorch can do
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:200]}")


if __name__ == "__main__":
    main()
