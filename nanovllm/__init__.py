"""nanovllm: a small, readable, fast offline LLM inference engine with pluggable backends."""
import os
import sys

# Before torch loads OpenMP (when nanovllm is imported first, as by the `nanovllm` command): idle OpenMP threads
# spin briefly, then sleep. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs a wake-up at each of a step's hundreds
# of small parallel ops: the cpu backend ran SmolLM2-135M 1.3-1.4x slower so on an idle 2-core machine. Spinning
# long (OpenMP's defaults) makes runs many times slower when other processes share the cores. libgomp (Linux
# builds of torch) spins GOMP_SPINCOUNT rounds under ACTIVE, 1,000 when its threads outnumber the cores; LLVM's
# libomp (macOS builds) KMP_BLOCKTIME milliseconds. Values the user set are kept.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ and "KMP_BLOCKTIME" not in os.environ:
    if sys.platform.startswith("linux"):
        os.environ.update(OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT="10000")
    else:
        os.environ["KMP_BLOCKTIME"] = "1"

from nanovllm.core.hookspecs import hookimpl
from nanovllm.core.plugins import PLUGIN_API
from nanovllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from nanovllm.structured_outputs import StructuredOutputs

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "BeamSearchParams", "RequestOutputKind", "StructuredOutputs",
           "RequestOutput", "CompletionOutput", "Logprob", "hookimpl", "PLUGIN_API"]


def __getattr__(name):
    if name == "LLM":  # imported lazily: it pulls in transformers
        from nanovllm.llm import LLM
        return LLM
    if name == "AsyncLLM":
        from nanovllm.async_llm import AsyncLLM
        return AsyncLLM
    if name in ("RequestOutput", "CompletionOutput", "Logprob"):  # what generate returns (vLLM's names)
        from nanovllm import outputs
        return getattr(outputs, name)
    raise AttributeError(f"module 'nanovllm' has no attribute {name!r}")
