"""Llama (Llama 2 and 3.x incl. llama3 rope scaling, TinyLlama, SmolLM2): the shared decoder as is.

Its optional biases (`attention_bias` on q/k/v/o, `mlp_bias` on the MLP) are read from the config.
"""
from nanovllm.models.decoder import CausalLM


class LlamaForCausalLM(CausalLM):
    pass
