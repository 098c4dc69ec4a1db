"""nanovllm: a small, readable, fast offline LLM inference engine with pluggable backends."""
import os

# Before torch loads OpenMP (when nanovllm is imported first, as by the `nanovllm` command): idle OpenMP threads
# sleep instead of spinning, so CPU runs do not slow down manyfold when other processes share the cores.
# A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
