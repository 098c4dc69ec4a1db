"""ModelRunner: prepares, launches and waits for the steps of the model on the backend's device.

It builds each step's StepMetadata once, runs the model (eagerly or through the backend's captured
graphs) and hands the logits to its StepSampler (`core/sampling/step_sampler.py`). A decode step whose sampling
is plain runs through a graph that also captured the plan's `sampler` kernel, when the backend captured one
(`graphs.samples`): the graph returns the tokens. It knows the backend only through the Backend interface and
the KernelPlan.

Its start-up lives in `core/runner_setup.py`: `ModelRunner(...)` builds the model there
(`build_model`), then `runner_setup.set_up(runner)` sizes and allocates the KV cache, warms up and
captures graphs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nanovllm.core.config import EngineConfig
from nanovllm.core.kernel_output import kernel_label
from nanovllm.core.parallel.communicator import Communicator
from nanovllm.core.sampling.prompt_logprobs import split_prompt_logprobs
from nanovllm.core.runner_setup import build_model
from nanovllm.core.scheduler import ScheduledBatch
from nanovllm.core.sequence import PENDING_TOKEN
from nanovllm.core.startup import Resolved
from nanovllm.core.step_inputs import Pending, Step, StepInputBuilder
from nanovllm.core.sampling.step_sampler import LaunchedStep, StepSampler
from nanovllm.core.step_metadata import StepMetadata
from nanovllm.core.parallel.step_transport import pack_step, step_to_device

if TYPE_CHECKING:
    from nanovllm.core.parallel.worker_group import WorkerGroup


class ModelRunner:
    def __init__(self, config: EngineConfig, resolved: Resolved, comm: Communicator,
                 workers: "WorkerGroup | None" = None):
        """`workers` is rank 0's handle on the other ranks under tensor parallelism (None otherwise)."""
        backend, plan, block_size = resolved.backend, resolved.plan, resolved.block_size
        self.config, self.backend, self.plan, self.comm = config, backend, plan, comm
        self.workers = workers
        self.hf_config = config.hf_config
        self.dtype, self.block_size = resolved.dtype, block_size
        self.kv_dtype = plan.query.kv_dtype if plan.query is not None else self.dtype  # what the KV cache stores
        self.kv_scales: torch.Tensor | None = None  # FP8: [num_layers, 2 (K, V), num_kv_heads] float32
        self.device = backend.device(config, comm.rank)
        self.sampler = plan.fn("sampler")
        self.max_num_blocks_per_seq = -(-config.max_model_len // block_size)
        self.model = build_model(config, resolved, comm, self.device, self.kernel_label)
        self.attention_layers = self.model.attention_layers()
        self.num_blocks = 0
        self.graphs = None
        # row counts the LM head ran at during start-up (the captured graphs' batch sizes): prefill steps pad their
        # sampled rows to one of them (`padded_rows`)
        self.logit_row_sizes: list[int] = []
        self.sampling = StepSampler(backend, self.device, self.kernel_label, self.hf_config.vocab_size)
        self.inputs: StepInputBuilder | None = None  # sized with the KV cache (runner_setup.allocate_kv_cache)

    def reset_step_state(self) -> None:
        """Forget what one step hands the next (after a failed step)."""
        self.sampling.reset()

    # ---- one step -------------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch, pending: Pending = ((), ())) -> Step:
        """The step's input ids, positions, metadata and pending-token index (see `StepInputBuilder.build`), built
        once on the host and copied to the device.

        Under TP rank 0 also sends the host copy to the workers here.
        """
        if self.workers is None:
            return self.inputs.build(batch, pending)
        host = self.inputs.build(batch, pending)
        self.workers.send_step(pack_step(host[:3]))
        return step_to_device(host, self.device)

    @torch.inference_mode()
    def execute(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata) -> torch.Tensor | None:
        """Logits of the tokens in meta.logits_indices (None on ranks other than 0 under TP)."""
        if self.graphs is not None and meta.prefill is None and self.graphs.can_run(input_ids.numel()):
            return self.graphs.run(input_ids, positions, meta)
        hidden = self.model(input_ids, positions, meta)
        rows = meta.logits_indices
        logits = self.model.compute_logits(hidden[padded_rows(rows, self.logit_row_sizes)])
        return None if logits is None else logits[:rows.numel()]

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: LaunchedStep | None = None) -> LaunchedStep:
        """Start one step on the device and return without waiting for its sampled tokens.

        Sequences whose input token was sampled by `prev` (still in flight) read it from prev's device
        tensor, so the host never waits for it.
        """
        input_ids, positions, meta, pending = self.prepare(batch, self._pending_rows(batch, prev))
        if pending is not None:
            input_ids[pending[0]] = prev.tokens[pending[1]]
        if self.workers is not None:  # the workers' copy lacks the tokens filled in from `prev`
            self.comm.broadcast(input_ids)
        params = self.graph_sampling(batch, input_ids, meta)
        if params is not None:
            return self.sampling.launch_sampled(batch, self.graphs.run_and_sample(input_ids, positions, meta, params))
        logits = self.execute(input_ids, positions, meta)
        logits, prompt = split_prompt_logprobs(logits, meta, batch)
        return self.sampling.launch(batch, logits, self.sampler, prompt)

    @staticmethod
    def _pending_rows(batch: ScheduledBatch, prev: LaunchedStep | None) -> Pending:
        """(rows of `batch`, rows of prev's tokens) for the sequences whose input token `prev` is still sampling."""
        dst, src = [], []
        if prev is not None and prev.rows:
            for i, seq in enumerate(batch.seqs):
                row = prev.rows.get(seq.seq_id)
                if row is not None and seq.token_ids[seq.num_computed_tokens] == PENDING_TOKEN:
                    dst.append(i), src.append(row)
        return dst, src

    def graph_sampling(self, batch: ScheduledBatch, input_ids: torch.Tensor, meta: StepMetadata):
        """The step's SamplingTensors when a captured graph samples it in place (a decode step the graphs serve,
        graphs that captured the sampler, plain sampling: `StepSampler.plain`), else None."""
        if (self.graphs is None or not self.graphs.samples or meta.prefill is not None or meta.prompt_logprob_rows
                or not self.graphs.can_run(input_ids.numel())):
            return None
        return self.sampling.plain(batch)

    def wait(self, step: LaunchedStep):
        return self.sampling.wait(step)

    def kernel_label(self, op: str) -> str:
        """Words naming the kernel that runs `op` now and its plugin (for errors about its output)."""
        return kernel_label(self.plan, op)


def padded_rows(rows: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """`rows` with its last entry repeated up to the smallest of `sizes` that holds it (unchanged when it is empty, one
    of `sizes`, or longer than all). The LM head then meets in a prefill step only row counts it already ran at
    start-up: on an H200 cuBLAS's first call for a row count that needs a kernel not yet used costs ~3 ms of host
    time (LM head at 19, 25, 33, 47 rows in the seed run; benchmarks/RESULTS.md, round nineteen), where the extra
    rows cost nothing measurable (the LM head is bound by its weight's read at these sizes)."""
    n = rows.numel()
    size = next((s for s in sizes if s >= n), n) if n else 0
    return rows if size == n else torch.cat((rows, rows[-1:].expand(size - n)))
