"""CUDA graphs for decode steps: one graph per batch size, replayed over static input buffers.

The static inputs are DecodeRecords (`core/decode_record.py`): the step builder's two device records, one per graph
instance (the builder alternates them, so consecutive steps alternate instances), so a decode step arrives in place
with one host-to-device copy, made while the step before runs (`record_copier.py`), and the replay copies nothing.
Under tensor parallelism, where steps are built on the host, both instances read one record of the graphs' own
that each step is copied into.
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
        # The static inputs are the step builder's two device records when it builds on this device (instance i
        # reads record i): its decode steps then arrive in place, padded to the graphs' sizes. Under tensor
        # parallelism steps are built on the host: both instances read one record of the graphs' own, each step
        # copied in.
        records = runner.inputs.records
        if records is None:
            own = DecodeRecord(n, width, dev)
            records = [own, own]
        elif records[0].max_seqs != n:
            raise RuntimeError(f"the step builder's records hold {records[0].max_seqs} rows, the largest graph {n}")
        else:
            runner.inputs.pad_sizes = self.batch_sizes
        for record in records:
            record.clear()  # the warm-up steps wrote real rows: replayed as padding they would store K/V
        self.records = records  # instance i reads records[i]
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
                first = records[0]
                meta = self._meta(first, bs, max_len)
                logits = model.compute_logits(model(first.ids[:bs], first.positions[:bs], meta))  # warm-up
                # under tensor parallelism only rank 0 has logits, and only it samples
                self.samples = sampler is not None and logits is not None
                params = SamplingTensors(self.temperatures[:bs], seed=runner.sampling.seed)
                if self.samples:
                    sampler(logits, params)
                for instance, record in enumerate(records):
                    meta = self._meta(record, bs, max_len)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool):
                        logits = model.compute_logits(model(record.ids[:bs], record.positions[:bs], meta))
                        if self.samples:
                            self.tokens[bs, instance] = sampler(logits, params)
                    pool = graph.pool()
                    self.graphs[bs, instance], self.logits[bs, instance] = graph, logits
        torch.cuda.synchronize(dev)
        logger.info("captured CUDA graphs for decode batch sizes %s%s", self.batch_sizes,
                    ", sampling inside them" if self.samples else "")

    @staticmethod
    def _meta(record: DecodeRecord, bs: int, max_context_len: int) -> StepMetadata:
        # no seq_order: decode kernels start programs in batch order, which the scheduler makes longest first
        decode = DecodeMetadata(record.context_lens[:bs], record.tables[:bs], max_context_len)
        return StepMetadata(record.slots[:bs], 0, None, decode, torch.arange(bs, device=record.ids.device))

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
        ptr = input_ids.data_ptr()
        built_in = next((i for i, r in enumerate(self.records) if r.ids.data_ptr() == ptr), None)
        if built_in is not None:  # built in place, in this instance's record
            self.turn = built_in
        else:  # not built in place: copy the step into the graphs' own record, pad it
            self.turn ^= 1
            self._copy_in(self.records[self.turn], input_ids, positions, meta, n, bs)
        self.graphs[bs, self.turn].replay()
        return bs

    @staticmethod
    def _copy_in(record: DecodeRecord, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata, n: int,
                 bs: int):
        record.ids[:n].copy_(input_ids)
        record.positions[:n].copy_(positions)
        record.slots[:n].copy_(meta.slot_mapping)
        record.slots[n:bs].fill_(-1)
        record.context_lens[:n].copy_(meta.decode.context_lens)
        record.context_lens[n:bs].zero_()
        width = meta.decode.block_tables.shape[1]
        record.tables[:n, :width].copy_(meta.decode.block_tables)
