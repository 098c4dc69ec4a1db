"""nanovllm: a small, readable, fast offline LLM inference engine with pluggable backends."""
from nanovllm.core.hookspecs import hookimpl
from nanovllm.core.plugins import PLUGIN_API
from nanovllm.sampling_params import SamplingParams
from nanovllm.structured_outputs import StructuredOutputs

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "StructuredOutputs", "hookimpl", "PLUGIN_API"]


def __getattr__(name):
    if name == "LLM":  # imported lazily: it pulls in transformers
        from nanovllm.llm import LLM
        return LLM
    if name == "AsyncLLM":
        from nanovllm.async_llm import AsyncLLM
        return AsyncLLM
    raise AttributeError(f"module 'nanovllm' has no attribute {name!r}")
