"""CUDA graphs for decode steps: one graph per batch size, replayed over static input buffers.

The block-table buffer is as wide as max_model_len needs, so any sequence the engine accepts fits
(a narrower buffer is a known nano-vllm bug). Padding rows store nothing (slot -1) and attend to nothing.
"""
import torch

from nanovllm.core.logging import get_logger
from nanovllm.core.step_metadata import DecodeMetadata, StepMetadata

logger = get_logger(__name__)


class CudaGraphRunner:
    def __init__(self, runner, batch_sizes: list[int]):
        self.batch_sizes = sorted(batch_sizes)
        self.max_batch_size = self.batch_sizes[-1]
        n, width, dev = self.max_batch_size, runner.max_num_blocks_per_seq, runner.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=dev)
        # longest-first order of the real rows, then the padding rows in place (DecodeMetadata.seq_order)
        self.iota = torch.arange(n, dtype=torch.int32, device=dev)
        self.seq_order = self.iota.clone()
        # Two instances per size: launching a graph exec that is still running blocks the host until it ends,
        # so consecutive (pipelined) steps alternate between instances.
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.turn = 0
        model, max_len = runner.model, runner.config.max_model_len
        pool = None
        with torch.inference_mode():
            for bs in reversed(self.batch_sizes):
                meta = self._meta(bs, max_len)
                model.compute_logits(model(self.input_ids[:bs], self.positions[:bs], meta))  # warm-up
                for instance in range(2):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool):
                        logits = model.compute_logits(model(self.input_ids[:bs], self.positions[:bs], meta))
                    pool = graph.pool()
                    self.graphs[bs, instance], self.logits[bs, instance] = graph, logits
        torch.cuda.synchronize(dev)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.batch_sizes)

    def _meta(self, bs: int, max_context_len: int) -> StepMetadata:
        decode = DecodeMetadata(self.context_lens[:bs], self.block_tables[:bs], max_context_len, self.seq_order[:bs])
        return StepMetadata(self.slot_mapping[:bs], 0, None, decode, torch.arange(bs, device=self.input_ids.device))

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_batch_size

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        n = input_ids.numel()
        bs = next(b for b in self.batch_sizes if b >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:bs].fill_(-1)
        self.context_lens[:n].copy_(meta.decode.context_lens)
        self.context_lens[n:bs].zero_()
        if meta.decode.seq_order is not None:
            self.seq_order[:n].copy_(meta.decode.seq_order)
        else:
            self.seq_order[:n].copy_(self.iota[:n])
        self.seq_order[n:bs].copy_(self.iota[n:bs])  # a larger batch's order may be left there
        width = meta.decode.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.decode.block_tables)
        self.turn ^= 1
        self.graphs[bs, self.turn].replay()
        return self.logits[bs, self.turn][:n]
