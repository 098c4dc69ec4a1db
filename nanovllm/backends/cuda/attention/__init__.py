"""Attention kernels of the cuda backend: Triton paged prefill/decode and thin adapters over FlashAttention."""
