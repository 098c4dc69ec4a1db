"""cpu_ref's KV store: the reference store of `core/kv_store.py` (kept at this path for plugins that import it)."""
from nanovllm.core.kv_store import store_kvcache

__all__ = ["store_kvcache"]
