"""The MPS KV cache budget: a fixed number of blocks, since MPS cannot say how much memory is free.

Apple GPUs share unified memory with the OS and every other process, and torch exposes no reliable
free-memory query for them, so nothing is measured: the budget is the user's `num_kvcache_blocks`, or
DEFAULT_NUM_KVCACHE_BLOCKS. A budget too small for one `max_model_len` sequence is refused when the
cache is allocated (`core/runner_setup.allocate_kv_cache`), with the number of blocks needed.
"""
import torch

from nanovllm.core.config import EngineConfig
from nanovllm.core.logging import get_logger

logger = get_logger(__name__)

DEFAULT_NUM_KVCACHE_BLOCKS = 1024


def kv_cache_budget(config: EngineConfig, device: torch.device, bytes_per_block: int) -> int:
    """num_kvcache_blocks, or DEFAULT_NUM_KVCACHE_BLOCKS when the user set none."""
    num_blocks = config.num_kvcache_blocks or DEFAULT_NUM_KVCACHE_BLOCKS
    cache_bytes = num_blocks * bytes_per_block
    logger.debug("mps KV budget: %d blocks (%s), %.2f GiB on %s", num_blocks,
                 "num_kvcache_blocks" if config.num_kvcache_blocks else "default", cache_bytes / 2**30, device)
    if device.type == "mps":
        recommended = torch.mps.recommended_max_memory()
        if cache_bytes > recommended:
            logger.warning("the KV cache (%d blocks, %.2f GiB) exceeds Metal's recommended working set of %.2f GiB; "
                           "expect swapping, or lower num_kvcache_blocks", num_blocks, cache_bytes / 2**30,
                           recommended / 2**30)
    return num_blocks
