"""Up-front checks that a model and backend can be split over tensor_parallel_size ranks.

They run on rank 0 before any worker process starts, so a bad size costs no spawn and names the fix.
"""
from nanovllm.core.backend import Backend
from nanovllm.core.config import EngineConfig


def check_tensor_parallel(config: EngineConfig, backend: Backend) -> None:
    """Raise ValueError (sizes) or RuntimeError (backend, devices) when TP of this size cannot run."""
    tp, hf = config.tensor_parallel_size, config.hf_config
    if backend.dist_backend is None:  # the backend refuses TP: its communicator raises its own reason
        backend.communicator(0, tp, "")
        raise RuntimeError(f"backend {backend.name!r} does not support tensor parallelism; use tensor_parallel_size=1")
    heads, kv_heads = hf.num_attention_heads, hf.num_key_value_heads
    if heads % tp:
        raise ValueError(f"num_attention_heads={heads} is not divisible by tensor_parallel_size={tp}; "
                         f"choose a tensor_parallel_size that divides {heads}")
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(f"num_key_value_heads={kv_heads} and tensor_parallel_size={tp}: one must divide the other "
                         f"so KV heads split (or replicate) evenly; choose another tensor_parallel_size")
    intermediate = getattr(hf, "intermediate_size", None)
    if intermediate is not None and intermediate % tp:
        raise ValueError(f"intermediate_size={intermediate} is not divisible by tensor_parallel_size={tp}; "
                         f"choose a tensor_parallel_size that divides it")
    backend.device(config, tp - 1)  # raises when the machine has fewer devices than ranks
