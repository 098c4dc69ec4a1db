"""nanovllm-example-backend: a third-party CPU backend for nanovllm with batched attention kernels."""
