"""The cuda backend: Triton and FlashAttention kernels for NVIDIA GPUs."""
