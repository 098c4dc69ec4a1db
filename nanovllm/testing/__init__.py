"""Public test helpers for nanovllm and its plugin authors: tiny random models and parity checks."""
