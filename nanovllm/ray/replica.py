"""LLMReplica: one engine replica, the callable class Ray Data runs in each actor of the pool."""
from nanovllm.core.logging import get_logger
from nanovllm.ray.rows import OUTPUT_COLUMNS, generate_rows

logger = get_logger(__name__)


class LLMReplica:
    """Builds one LLM when the actor starts and keeps it for the actor's life; each call generates one batch
    of rows with the engine's continuous batching. Knows Ray Data only through the batch format (pyarrow)."""

    def __init__(self, model: str | None, backend: str | None, engine_options: dict, sampling_params: dict):
        from nanovllm import LLM
        self.llm = LLM(model, backend=backend, **engine_options)
        self.sampling_params = sampling_params
        logger.info("replica ready: %s on %s", self.llm.config.model, self.llm.kernel_plan().backend)

    def __call__(self, batch):
        """batch: a pyarrow.Table of rows -> the same table with the output columns appended."""
        rows = generate_rows(self.llm, batch.to_pylist(), self.sampling_params)
        return output_table(batch, rows)


def output_table(batch, rows: list[dict]):
    """The input columns as they came (types kept) plus the output columns with fixed types, so that batches
    of only refused rows (all-null text) still concatenate with the others."""
    import pyarrow as pa
    types = {"generated_text": pa.string(), "token_ids": pa.list_(pa.int64()), "finish_reason": pa.string(),
             "num_prompt_tokens": pa.int64(), "num_generated_tokens": pa.int64(), "error": pa.string()}
    table = batch.drop_columns([c for c in OUTPUT_COLUMNS if c in batch.column_names])
    for name in OUTPUT_COLUMNS:
        table = table.append_column(pa.field(name, types[name]), pa.array([r[name] for r in rows], types[name]))
    return table
