"""ModelRunner: loads the model on the backend's device, sizes and binds the KV cache, and runs steps.

It builds each step's StepMetadata once, runs the model (eagerly or through the backend's captured
graphs) and samples. It knows the backend only through the Backend interface and the KernelPlan.
"""
from typing import NamedTuple

import torch

from nanovllm.core.backend import Backend
from nanovllm.core.config import EngineConfig
from nanovllm.core.logging import get_logger
from nanovllm.core.logprobs import RequestedLogprobs, StepLogprobs
from nanovllm.core.parallel import Communicator
from nanovllm.core.registry import KernelPlan
from nanovllm.core.sampler import SamplingTensors, suppress_tokens
from nanovllm.core.scheduler import ScheduledBatch
from nanovllm.core.step_metadata import DecodeMetadata, PrefillMetadata, StepMetadata
from nanovllm.models.layers.context import LayerContext
from nanovllm.models.loader import load_model
from nanovllm.models.registry import model_class

logger = get_logger(__name__)


class StepOutput(NamedTuple):
    """Per sequence of the batch: the sampled token (None while its prompt is not done) and, for requests that
    asked, the step's log-probabilities (`logprobs` is None when no request in the step asked)."""
    token_ids: list[int | None]
    logprobs: list[StepLogprobs | None] | None = None


class ModelRunner:
    def __init__(self, config: EngineConfig, backend: Backend, plan: KernelPlan, comm: Communicator,
                 dtype: torch.dtype, block_size: int):
        self.config, self.backend, self.plan, self.comm = config, backend, plan, comm
        self.hf_config = config.hf_config
        self.dtype, self.block_size = dtype, block_size
        self.device = backend.device(config, comm.rank)
        self.sampler = plan.fn("sampler")
        self.max_num_blocks_per_seq = -(-config.max_model_len // block_size)
        backend.seed(config.seed)
        default_dtype = torch.get_default_dtype()
        try:
            torch.set_default_dtype(dtype)
            with torch.device(self.device):
                self.model = model_class(self.hf_config)(self.hf_config, LayerContext(comm, plan))
        finally:
            torch.set_default_dtype(default_dtype)
        load_model(self.model, config.model)
        self.attention_layers = [m for m in self.model.modules() if type(m).__name__ == "Attention"]
        self.num_blocks = 0
        self.graphs = None

    # ---- start-up -------------------------------------------------------------------------------
    def warmup(self) -> None:
        """Run the largest prefill once without a cache, so the backend can measure peak memory."""
        c = self.config
        num_seqs = max(1, min(c.max_num_seqs, c.max_num_batched_tokens // c.max_model_len))
        seq_len = min(c.max_model_len, c.max_num_batched_tokens // num_seqs)
        n = num_seqs * seq_len
        cu = torch.arange(0, n + 1, seq_len, dtype=torch.int32, device=self.device)
        meta = StepMetadata(slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=self.device),
                            num_prefill_tokens=n, prefill=PrefillMetadata(cu, cu, seq_len, seq_len), decode=None,
                            logits_indices=cu[1:].long() - 1)
        input_ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        positions = torch.arange(seq_len, device=self.device).repeat(num_seqs)
        self.execute(input_ids, positions, meta)
        self.backend.synchronize(self.device)

    def bytes_per_block(self) -> int:
        layer = self.attention_layers[0]
        return (2 * len(self.attention_layers) * self.block_size * layer.num_kv_heads * layer.head_dim
                * torch.empty(0, dtype=self.dtype).element_size())

    def allocate_kv_cache(self, num_blocks: int) -> None:
        needed = self.max_num_blocks_per_seq
        if num_blocks < needed:
            raise ValueError(f"the KV cache budget of {num_blocks} blocks of {self.block_size} tokens cannot hold one "
                             f"sequence of max_model_len={self.config.max_model_len} ({needed} blocks needed): raise "
                             f"num_kvcache_blocks (or the memory fraction), or lower max_model_len")
        layer = self.attention_layers[0]
        caches = self.backend.allocate_kv_cache(len(self.attention_layers), num_blocks, self.block_size,
                                                layer.num_kv_heads, layer.head_dim, self.dtype, self.device)
        for attn, (k_cache, v_cache) in zip(self.attention_layers, caches):
            attn.k_cache, attn.v_cache = k_cache, v_cache
        self.num_blocks = num_blocks
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, self.block_size,
                    num_blocks * self.bytes_per_block() / 2**30)

    def capture_graphs(self) -> None:
        if self.config.enforce_eager or not self.backend.supports_graphs:
            return
        sizes = [s for s in (1, 2, 4, 8) if s < self.config.max_num_seqs]
        sizes += list(range(16, self.config.max_num_seqs + 1, 16)) or [self.config.max_num_seqs]
        if sizes[-1] != self.config.max_num_seqs:
            sizes.append(self.config.max_num_seqs)
        self.graphs = self.backend.capture_graphs(self, sizes)

    # ---- one step -------------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
        """The step's inputs and metadata, built once on the host and copied to the device."""
        bs = self.block_size
        input_ids, positions, slots, logits_indices = [], [], [], []
        cu_q, cu_k, tables, context_lens = [0], [0], [], []
        p = batch.num_prefill_seqs
        any_cached = False
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[t // bs] * bs + t % bs for t in range(start, end))
            if batch.sample[i]:
                logits_indices.append(len(input_ids) - 1)
            if i < p:
                cu_q.append(cu_q[-1] + n)
                cu_k.append(cu_k[-1] + end)
                any_cached |= start > 0
            else:
                context_lens.append(end)
            tables.append(table)
        dev = self.device

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        def block_table_tensor(rows):
            width = max(len(r) for r in rows)
            return tensor([r + [0] * (width - len(r)) for r in rows], torch.int32)

        prefill = decode = None
        if p:
            prefill = PrefillMetadata(tensor(cu_q, torch.int32), tensor(cu_k, torch.int32),
                                      max(b - a for a, b in zip(cu_q, cu_q[1:])),
                                      max(b - a for a, b in zip(cu_k, cu_k[1:])),
                                      block_table_tensor(tables[:p]) if any_cached else None)
        if len(batch.seqs) > p:
            decode = DecodeMetadata(tensor(context_lens, torch.int32), block_table_tensor(tables[p:]), max(context_lens))
        meta = StepMetadata(tensor(slots, torch.int64), cu_q[-1], prefill, decode, tensor(logits_indices, torch.int64))
        return tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta

    @torch.inference_mode()
    def execute(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata) -> torch.Tensor | None:
        """Logits of the tokens in meta.logits_indices (None on ranks other than 0 under TP)."""
        if self.graphs is not None and meta.prefill is None and self.graphs.can_run(input_ids.numel()):
            return self.graphs.run(input_ids, positions, meta)
        hidden = self.model(input_ids, positions, meta)
        return self.model.compute_logits(hidden[meta.logits_indices])

    def sampling_tensors(self, seqs) -> SamplingTensors:
        params = [s.params for s in seqs]
        temperatures = torch.tensor([p.temperature for p in params], dtype=torch.float32).to(self.device)
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        gens = [s.generator for s in seqs]
        return SamplingTensors(
            temperatures=temperatures,
            top_k=torch.tensor(top_k, device=self.device) if any(top_k) else None,
            top_p=torch.tensor(top_p, dtype=torch.float32, device=self.device) if any(x < 1 for x in top_p) else None,
            min_p=torch.tensor(min_p, dtype=torch.float32, device=self.device) if any(min_p) else None,
            generators=gens if any(g is not None for g in gens) else None,
            all_greedy=all(p.greedy for p in params))

    @staticmethod
    def suppress_stop_tokens(logits: torch.Tensor, seqs) -> None:
        """min_tokens: EOS and stop tokens cannot be sampled before a sequence has min_tokens output tokens."""
        pairs = [(row, t) for row, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens
                 for t in s.stop_token_ids]
        if pairs:
            rows, token_ids = zip(*pairs)
            suppress_tokens(logits, list(rows), list(token_ids))

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepOutput:
        """Run one step; the sampled tokens are its one device->host copy unless a request asked for logprobs."""
        input_ids, positions, meta = self.prepare(batch)
        logits = self.execute(input_ids, positions, meta)
        sampled_seqs = [s for s, want in zip(batch.seqs, batch.sample) if want]
        if not sampled_seqs:
            return StepOutput([None] * len(batch.seqs))
        requested = RequestedLogprobs.select(logits, sampled_seqs)  # raw logits: before any masking
        self.suppress_stop_tokens(logits, sampled_seqs)
        sampled = self.sampler(logits, self.sampling_tensors(sampled_seqs))
        token_ids = in_batch_order(batch.sample, sampled.tolist())
        if requested is None:
            return StepOutput(token_ids)
        return StepOutput(token_ids, in_batch_order(batch.sample, requested.to_host(sampled)))


def in_batch_order(sample: list[bool], values: list) -> list:
    """Spread one value per sampled sequence over the batch, None for sequences not sampled this step."""
    values = iter(values)
    return [next(values) if want else None for want in sample]
