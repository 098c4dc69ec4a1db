"""The cpu backend: the fast path on CPUs, chosen before the cpu_ref oracle when no GPU is there.

Vectorised paged attention through torch's fused SDPA (`attention.py`), linear layers through oneDNN
with weights packed once (`linear.py`), an index_copy_ KV store, a sampler without a vocabulary sort
(`sampler.py`), a thread count from the cores other work leaves free
(`threads.py`) and a KV budget sized to max_num_seqs x max_model_len (`memory.py`). bfloat16 where
the CPU computes it natively (AVX-512 BF16 or AMX), else float32: measured with SmolLM2-135M on an
AVX-512 BF16 CPU, bfloat16 decodes 1.5-2x faster; without those instructions torch emulates it and it
is slower than float32. Tensor parallelism over gloo, as cpu_ref.
"""
import torch

import nanovllm
from nanovllm.core.backend import Backend, Fraction
from nanovllm.core.config import EngineConfig
from nanovllm.core.logging import get_logger
from nanovllm.core.registry import KernelQuery

NANOVLLM_PLUGIN_API = (1, 0)

logger = get_logger(__name__)


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions torch uses (x86: AVX-512 BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


class CpuBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    default_dtype = torch.bfloat16 if native_bfloat16() else torch.float32
    supported_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    default_block_size = 16
    supports_graphs = False
    dist_backend = "gloo"
    options = {"cpu_memory_fraction": Fraction(0.3, "the most of the free RAM the KV cache may take")}

    def device(self, config: EngineConfig, rank: int = 0) -> torch.device:
        if config.device not in (None, "cpu"):
            raise ValueError(f"device={config.device!r}: the cpu backend runs on 'cpu' only")
        return torch.device("cpu")

    def configure_process(self, config: EngineConfig) -> None:
        from nanovllm.backends.cpu.threads import choose_threads
        threads, why = choose_threads(config.threads)
        torch.set_num_threads(threads)
        logger.info("cpu backend: %d thread%s (%s); set threads= / --threads to change", threads,
                    "" if threads == 1 else "s", why)

    def prepare_model(self, model, dtype: torch.dtype) -> None:
        from nanovllm.backends.cpu.linear import pack_linear_weights
        pack_linear_weights(model, dtype)

    def kv_cache_budget(self, config: EngineConfig, device: torch.device, bytes_per_block: int) -> int:
        from nanovllm.backends.cpu import memory
        block_size = config.kvcache_block_size or self.default_block_size
        return memory.kv_cache_budget(config, block_size, bytes_per_block, self.option(config, "cpu_memory_fraction"))


@nanovllm.hookimpl
def nanovllm_register_backends():
    return [CpuBackend()]


def check_query(query: KernelQuery) -> list[str]:
    reasons = []
    if query.device_type != "cpu":
        reasons.append(f"runs on cpu tensors, not {query.device_type}")
    if query.dtype not in CpuBackend.supported_dtypes:
        reasons.append(f"dtype {query.dtype} is not one of {', '.join(map(str, CpuBackend.supported_dtypes))}")
    if query.kv_cache_dtype not in (None, query.dtype):
        reasons.append(f"the KV cache holds the model dtype only, not {query.kv_cache_dtype}")
    return reasons + query.head_reasons()


@nanovllm.hookimpl
def nanovllm_register_kernels(registry):
    from nanovllm.backends.cpu import attention, elementwise, kv_store, sampler
    registry.register("kv_cache.store", "cpu", "index_copy", kv_store.store_kvcache, check=check_query)
    registry.register("attention.prefill", "cpu", "sdpa_padded", attention.prefill_attention, check=check_query)
    registry.register("attention.decode", "cpu", "sdpa_padded", attention.decode_attention, check=check_query)
    registry.register("sampler", "cpu", "torch_cdf", sampler.sample, check=check_query)
    registry.register("rotary.qk", "cpu", "torch_joint", elementwise.rotary_qk, check=check_query)
    registry.register("act.silu_mul", "cpu", "torch", elementwise.silu_mul, check=check_query)
    registry.register("norm.add_rms", "cpu", "torch", elementwise.add_rms_norm, check=check_query)
