"""CUDA graphs for decode steps: one graph per batch size, replayed over static input buffers.

The static inputs are a DecodeRecord (`core/decode_record.py`): the step builder's own device record, so a
decode step arrives in place with one host-to-device copy and the replay copies nothing (under tensor
parallelism, where steps are built on the host, a record of the graphs' own that each step is copied into).
Its block tables are as wide as max_model_len needs, so any sequence the engine accepts fits (a narrower
buffer is a known nano-vllm bug). Padding rows store nothing (slot -1) and attend to nothing.

When the plan's `sampler` kernel is graph-safe, each graph also samples after the LM head, over a static buffer
of per-row temperatures and the runner's device seed, which the kernel advances so every replay draws fresh
tokens; `run_and_sample` returns them (the runner uses it for plain decode steps). Other steps read the logits
and sample outside: they also pay the in-graph draw they ignore (~33 us at batch 256 on an H200), small next to
what made them other (a top-p sort, logprobs, penalties).
"""
import torch

from nanovllm.core.decode_record import DecodeRecord
from nanovllm.core.logging import get_logger
from nanovllm.core.sampler import SamplingTensors
from nanovllm.core.step_metadata import DecodeMetadata, StepMetadata

logger = get_logger(__name__)


class CudaGraphRunner:
    def __init__(self, runner, batch_sizes: list[int]):
        self.batch_sizes = sorted(batch_sizes)
        self.max_batch_size = self.batch_sizes[-1]
        n, width, dev = self.max_batch_size, runner.max_num_blocks_per_seq, runner.device
        # The static inputs are the step builder's device record when it builds on this device: its decode steps
        # then arrive in place, padded to the graphs' sizes. Under tensor parallelism steps are built on the host:
        # the graphs keep a record of their own and copy each step in.
        record = runner.inputs.record
        if record is None:
            record = DecodeRecord(n, width, dev)
        elif record.max_seqs != n:
            raise RuntimeError(f"the step builder's record holds {record.max_seqs} rows, the largest graph {n}")
        else:
            runner.inputs.pad_sizes = self.batch_sizes
        record.clear()  # the warm-up steps wrote real rows: replayed as padding they would store K/V
        self.record = record
        self.input_ids, self.positions, self.slot_mapping = record.ids, record.positions, record.slots
        self.context_lens, self.block_tables = record.context_lens, record.tables
        self.temperatures = torch.ones(n, dtype=torch.float32, device=dev)
        self._temperatures_from = None  # the SamplingTensors.temperatures last copied in (reused per batch)
        # Two instances per size: launching a graph exec that is still running blocks the host until it ends,
        # so consecutive (pipelined) steps alternate between instances.
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self.tokens: dict[tuple[int, int], torch.Tensor] = {}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.turn = 0
        model, max_len = runner.model, runner.config.max_model_len
        sampler = runner.sampler if runner.plan.choices["sampler"].impl.graph_safe else None
        self.samples = False
        pool = None
        with torch.inference_mode():
            for bs in reversed(self.batch_sizes):
                meta = self._meta(bs, max_len)
                logits = model.compute_logits(model(self.input_ids[:bs], self.positions[:bs], meta))  # warm-up
                # under tensor parallelism only rank 0 has logits, and only it samples
                self.samples = sampler is not None and logits is not None
                params = SamplingTensors(self.temperatures[:bs], seed=runner.sampling.seed)
                if self.samples:
                    sampler(logits, params)
                for instance in range(2):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool):
                        logits = model.compute_logits(model(self.input_ids[:bs], self.positions[:bs], meta))
                        if self.samples:
                            self.tokens[bs, instance] = sampler(logits, params)
                    pool = graph.pool()
                    self.graphs[bs, instance], self.logits[bs, instance] = graph, logits
        torch.cuda.synchronize(dev)
        logger.info("captured CUDA graphs for decode batch sizes %s%s", self.batch_sizes,
                    ", sampling inside them" if self.samples else "")

    def _meta(self, bs: int, max_context_len: int) -> StepMetadata:
        # no seq_order: decode kernels start programs in batch order, which the scheduler makes longest first
        decode = DecodeMetadata(self.context_lens[:bs], self.block_tables[:bs], max_context_len)
        return StepMetadata(self.slot_mapping[:bs], 0, None, decode, torch.arange(bs, device=self.input_ids.device))

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_batch_size

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        """The logits [num_seqs, vocab] of one decode step."""
        bs = self._replay(input_ids, positions, meta)
        return self.logits[bs, self.turn][:input_ids.numel()]

    def run_and_sample(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
                       params: SamplingTensors) -> torch.Tensor:
        """The token ids [num_seqs] the graph samples with params.temperatures (plain sampling only)."""
        n = input_ids.numel()
        if params.temperatures is not self._temperatures_from:
            self.temperatures[:n].copy_(params.temperatures)
            self._temperatures_from = params.temperatures
        bs = self._replay(input_ids, positions, meta)
        return self.tokens[bs, self.turn][:n]

    def _replay(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata) -> int:
        n = input_ids.numel()
        bs = next(b for b in self.batch_sizes if b >= n)
        if input_ids.data_ptr() != self.input_ids.data_ptr():  # not built in place: copy the step in, pad it
            self._copy_in(input_ids, positions, meta, n, bs)
        self.turn ^= 1
        self.graphs[bs, self.turn].replay()
        return bs

    def _copy_in(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata, n: int, bs: int):
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:bs].fill_(-1)
        self.context_lens[:n].copy_(meta.decode.context_lens)
        self.context_lens[n:bs].zero_()
        width = meta.decode.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.decode.block_tables)
