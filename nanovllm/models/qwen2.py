"""Qwen2 (and Qwen2.5): the shared decoder with biases on the q, k and v projections (not on o)."""
from nanovllm.models.decoder import CausalLM


class Qwen2ForCausalLM(CausalLM):
    qkv_bias = True
