"""Data-parallel batch inference on Ray Data: a pool of engine replicas (one LLM per Ray actor) over a Dataset.

    from nanovllm.ray import ProcessorConfig, build_processor
    processor = build_processor(ProcessorConfig(model=path, backend="cuda", concurrency=8, batch_size=64))
    out = processor(ray.data.from_items([{"prompt": "hello"}, {"messages": [...]}, {"prompt_token_ids": [...]}]))

Rows and columns: nanovllm/ray/rows.py. Ray (`pip install 'nanovllm[ray]'`) is imported only when a processor
is built; the engine knows nothing of it.
"""
from nanovllm.ray.config import ProcessorConfig
from nanovllm.ray.processor import Processor, build_processor
from nanovllm.ray.rows import OUTPUT_COLUMNS, generate_rows

__all__ = ["ProcessorConfig", "Processor", "build_processor", "generate_rows", "OUTPUT_COLUMNS"]
