"""LLMReplica: one engine replica, the callable class Ray Data runs in each actor of the pool."""
from collections.abc import Callable

from nanovllm.core.logging import get_logger
from nanovllm.ray.rows import OUTPUT_COLUMNS, generate_rows

logger = get_logger(__name__)


class LLMReplica:
    """Builds one LLM when the actor starts and keeps it for the actor's life; each call generates one batch
    of rows with the engine's continuous batching. Knows Ray Data only through the batch format (pyarrow).

    `preprocess` and `postprocess` (row -> row) run here, around generation, rather than as stages of their own:
    a separate stage needs CPUs of its own, and on a machine whose CPUs the replicas hold it would never run.
    """

    def __init__(self, model: str | None, backend: str | None, engine_options: dict, sampling_params: dict,
                 preprocess: Callable[[dict], dict] | None = None, postprocess: Callable[[dict], dict] | None = None):
        from nanovllm import LLM
        self.llm = LLM(model, backend=backend, **engine_options)
        self.sampling_params = sampling_params
        self.preprocess = preprocess
        self.postprocess = postprocess
        logger.info("replica ready: %s on %s", self.llm.config.model, self.llm.kernel_plan().backend)

    def __call__(self, batch):
        """batch: a pyarrow.Table of rows -> the rows with the output columns appended (then postprocessed)."""
        if self.preprocess is not None:
            batch = rows_table([self.preprocess(row) for row in batch.to_pylist()])
        table = output_table(batch, generate_rows(self.llm, batch.to_pylist(), self.sampling_params))
        if self.postprocess is not None:
            table = rows_table([self.postprocess(row) for row in table.to_pylist()])
        return table


def rows_table(rows: list[dict]):
    """A pyarrow.Table of dicts that may lack some keys (None there), columns in first-seen order."""
    import pyarrow as pa
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return pa.table({c: [row.get(c) for row in rows] for c in columns})


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
