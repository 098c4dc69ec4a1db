"""Qwen3: the shared decoder with per-head RMSNorm on q and k."""
from nanovllm.models.decoder import CausalLM


class Qwen3ForCausalLM(CausalLM):
    qk_norm = True
