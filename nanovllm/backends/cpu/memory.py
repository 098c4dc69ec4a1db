"""The cpu backend's KV cache budget: what max_num_seqs sequences of max_model_len tokens need, bounded.

Not a fraction of free RAM: that reserved gigabytes for a 135M model and changed from run to run. The
budget is `num_kvcache_blocks` when set; else enough blocks for max_num_seqs full-length sequences, at
most MAX_KV_CACHE_BYTES (the scheduler preempts when a run needs more), at least one max_model_len
sequence, and never more than `cpu_memory_fraction` of the RAM available now. The cache is allocated
with torch.empty, so the OS commits its pages only as sequences write them (zeroing 1 GiB took 2 s here).
"""

from nanovllm.core.config import EngineConfig
from nanovllm.core.logging import get_logger

logger = get_logger(__name__)

MAX_KV_CACHE_BYTES = 1 << 30


def meminfo(key: str) -> int | None:
    """A /proc/meminfo value in bytes (MemAvailable, MemTotal), None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def kv_cache_budget(config: EngineConfig, block_size: int, bytes_per_block: int,
                    memory_fraction: float = 0.3) -> int:
    if config.num_kvcache_blocks is not None:
        return config.num_kvcache_blocks
    blocks_per_seq = -(-config.max_model_len // block_size)
    needed = config.max_num_seqs * blocks_per_seq
    num_blocks = max(blocks_per_seq, min(needed, MAX_KV_CACHE_BYTES // bytes_per_block))
    why = "max_num_seqs x max_model_len" if num_blocks == needed else f"capped at {MAX_KV_CACHE_BYTES >> 20} MiB"
    free = meminfo("MemAvailable")
    if free is not None and num_blocks * bytes_per_block > free * memory_fraction:
        num_blocks = max(1, int(free * memory_fraction) // bytes_per_block)
        why = f"cpu_memory_fraction={memory_fraction} of the {free / 2**30:.1f} GiB of RAM available"
    logger.debug("cpu KV budget: %d blocks (%s; %d needed for %d sequences of %d tokens)", num_blocks, why, needed,
                 config.max_num_seqs, config.max_model_len)
    return num_blocks

