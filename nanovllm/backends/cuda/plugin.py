"""The cuda backend: Triton paged kernels (flash-attn where it fits, PyTorch's flash attention if tuned),
CUDA graphs for decode, a KV budget measured after warm-up, and NCCL for tensor parallelism.

Kernels are imported lazily (inside the registration hook and the kernels' own modules), so this
plugin loads on machines without a GPU, triton or flash-attn and reports why it cannot run there.
"""
import importlib.util
import time

import torch

import nanovllm
from nanovllm.core.backend import Backend, Fraction, Switch
from nanovllm.core.logging import get_logger

logger = get_logger(__name__)

NANOVLLM_PLUGIN_API = (1, 0)


class CudaBackend(Backend):
    name = "cuda"
    device_type = "cuda"
    default_dtype = torch.bfloat16
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    kv_cache_dtypes = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
    supports_graphs = True
    measures_peak_memory = True
    pin_memory = True
    compile_small_ops = True
    dist_backend = "nccl"
    block_table_multiple = 16  # Triton specialises on a stride's divisibility by 16: a fixed multiple, one variant
    options = {"gpu_memory_utilization": Fraction(0.9, "the share of the GPU's memory the engine may use"),
               "fold_norms": Switch(True, "fold each layer's RMSNorms into the kernels around them (7 launches a "
                                          "layer instead of 9; backends/cuda/norm_folding.py)"),
               "fuse_products": Switch(True, "with folded norms, decode steps run the q/k/v and gate/up products "
                                             "with rotary + KV store and SiLU in their epilogues where measured "
                                             "faster (5 launches a layer; backends/cuda/qkv_rotary_store.py)"),
               "warm_products": Switch(True, "at start-up, run a decoder layer's products at row counts from 1 to "
                                             "max_num_batched_tokens, so no step pays cuBLAS's first call of a "
                                             "kernel (2-5 ms of host each; 3-5 s of start-up on an H200; "
                                             "backends/cuda/product_warmup.py)")}

    # The block size follows the kernels measured faster, not the packages installed: flash-attn's paged
    # kernels need blocks of a multiple of 256 tokens, and on an H200 the seed benchmark ran slower with them
    # and 256-token blocks (6.33 s) than with the Triton kernels and 16-token blocks (5.86 s), which also make
    # prefix caching finer-grained. So installing flash-attn changes nothing by default; it serves runs that
    # ask for kvcache_block_size=256 (or a multiple); `nanovllm tune --kvcache-block-size 256` times them there.
    default_block_size = 16

    def availability(self, device: str | None = None) -> tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, "torch.cuda.is_available() is False (no NVIDIA GPU, or a CPU-only build of torch)"
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (pip install triton)"
        return True, ""

    def device(self, config, rank: int = 0) -> torch.device:
        if config.device not in (None, "cuda") and not str(config.device).startswith("cuda"):
            raise ValueError(f"device={config.device!r}: the cuda backend runs on 'cuda' devices")
        device = torch.device(config.device or "cuda")
        index = (device.index or 0) + rank
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank} needs GPU {index}, but this machine has {torch.cuda.device_count()}; "
                               f"lower tensor_parallel_size")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)

    def configure_process(self, config) -> None:
        super().configure_process(config)
        self.fold_norms = bool(self.option(config, "fold_norms"))  # read by prepare_model, next in build_model
        self.fuse_products = bool(self.option(config, "fuse_products"))

    def prepare_model(self, model, dtype: torch.dtype) -> None:
        """The layers' RMSNorms folded into their neighbours (when `fold_norms` is on and the model allows it),
        and layers whose product the Triton decode GEMM does faster at some batch sizes (its table) get it there."""
        from nanovllm.backends.cuda.linear import install_triton_linear
        from nanovllm.backends.cuda.norm_folding import fold_norms
        why = (fold_norms(model, getattr(self, "fuse_products", True)) if getattr(self, "fold_norms", True)
               else "the fold_norms option is off")
        if why:
            logger.info("cuda backend: RMSNorms not folded (%s): 9 launches a decoder layer", why)
        else:
            logger.info("cuda backend: RMSNorms folded into the qkv and gate/up products: 7 launches a decoder layer "
                        "(fold_norms=False: the model's own order)")
        count = install_triton_linear(model, dtype)
        logger.debug("cuda backend: %d linear layers use the Triton decode GEMM at the batch sizes its table lists",
                     count)

    def warm_up(self, runner) -> None:
        """Each product of a decoder layer at the row counts a step can have (backends/cuda/product_warmup.py)."""
        if not self.option(runner.config, "warm_products"):
            return
        from nanovllm.backends.cuda.product_warmup import warm_up_products
        start = time.perf_counter()
        calls = warm_up_products(runner.model, runner.config.max_num_batched_tokens)
        torch.cuda.synchronize(runner.device)
        logger.info("cuda backend: warmed a decoder layer's products at rows 1-%d (%d calls, %.2f s)",
                    runner.config.max_num_batched_tokens, calls, time.perf_counter() - start)

    def check_block_size(self, block_size: int) -> list[str]:
        if block_size < 16:
            return [f"the cuda kernels need blocks of at least 16 tokens, got {block_size}"]
        return []

    def kv_cache_budget(self, config, device, bytes_per_block: int) -> int:
        """gpu_memory_utilization of the card, minus what is in use and the warm-up's peak activations."""
        if config.num_kvcache_blocks is not None:
            return config.num_kvcache_blocks
        free, total = torch.cuda.mem_get_info(device)
        stats = torch.cuda.memory_stats(device)
        peak, current = stats["allocated_bytes.all.peak"], stats["allocated_bytes.all.current"]
        available = total * self.option(config, "gpu_memory_utilization") - (total - free) - (peak - current)
        return max(0, int(available) // bytes_per_block)

    def capture_graphs(self, runner, batch_sizes: list[int]):
        unsafe = [f"{op} -> {c.impl.full_name}" for op, c in runner.plan.choices.items()
                  if op in ("kv_cache.store", "attention.decode", "rotary.qk_store") and runner.plan.calls(op)
                  and not c.impl.graph_safe]
        if unsafe:
            logger.warning("CUDA graphs are off: %s cannot be captured (it syncs with the host); decode runs "
                           "eagerly", ", ".join(unsafe))
            return None
        from nanovllm.backends.cuda.graphs import CudaGraphRunner
        return CudaGraphRunner(runner, batch_sizes)

    def device_name(self, device: torch.device) -> str:
        return torch.cuda.get_device_name(device)

    def synchronize(self, device) -> None:
        torch.cuda.synchronize(device)

    def record_copier(self, device):
        from nanovllm.backends.cuda.record_copier import SideStreamCopier
        return SideStreamCopier(device)

    def record_event(self, device):
        event = torch.cuda.Event()
        event.record()
        return event

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)


@nanovllm.hookimpl
def nanovllm_register_backends():
    return [CudaBackend()]


@nanovllm.hookimpl
def nanovllm_register_kernels(registry):
    from nanovllm.backends.cuda.kernels import register_cuda_kernels
    register_cuda_kernels(registry)
