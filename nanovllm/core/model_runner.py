"""ModelRunner: loads the model on the backend's device, sizes and binds the KV cache, and launches steps.

It builds each step's StepMetadata once, runs the model (eagerly or through the backend's captured
graphs) and hands the logits to its StepSampler (`core/step_sampler.py`). It knows the backend only
through the Backend interface and the KernelPlan.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nanovllm.core.config import EngineConfig
from nanovllm.core.kernel_output import check_token_ids, check_token_range, kernel_label
from nanovllm.models.fusion import fuse_small_ops
from nanovllm.core.kv_calibration import calibrate_kv_scales
from nanovllm.core.kv_quant import is_fp8
from nanovllm.core.logging import get_logger
from nanovllm.core.parallel.communicator import Communicator
from nanovllm.core.prompt_logprobs import split_prompt_logprobs
from nanovllm.core.scheduler import ScheduledBatch
from nanovllm.core.sequence import PENDING_TOKEN
from nanovllm.core.startup import Resolved
from nanovllm.core.step_inputs import StepInputBuilder
from nanovllm.core.step_sampler import LaunchedStep, StepSampler, to_device
from nanovllm.core.step_metadata import PrefillMetadata, StepMetadata
from nanovllm.core.warmup_steps import warm_up_full_steps
from nanovllm.core.parallel.step_transport import pack_step, step_to_device
from nanovllm.models.layers.context import LayerContext
from nanovllm.models.loader import load_model
from nanovllm.models.registry import model_class

if TYPE_CHECKING:
    from nanovllm.core.parallel.worker_group import WorkerGroup

logger = get_logger(__name__)


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights of a realistic scale, for benchmarks without a checkpoint."""
    gen = None
    for name, p in model.named_parameters():
        if gen is None:
            gen = torch.Generator(device=p.device).manual_seed(seed)
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)


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
        backend.configure_process(config)
        backend.seed(config.seed)
        default_dtype = torch.get_default_dtype()
        try:
            torch.set_default_dtype(self.dtype)
            with torch.device(self.device):
                kernels = {op: plan.fn(op) for op in plan.choices}
                self.model = model_class(self.hf_config)(self.hf_config, LayerContext(comm, kernels,
                                                                                            self.kernel_label))
        finally:
            torch.set_default_dtype(default_dtype)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed)
        else:
            load_model(self.model, config.model)
        self.attention_layers = self.model.attention_layers()
        backend.prepare_model(self.model, self.dtype)
        if config.compile if config.compile is not None else backend.compile_small_ops:
            fuse_small_ops(self.model, plan)
        self.num_blocks = 0
        self.graphs = None
        self.sampling = StepSampler(backend, self.device, self.kernel_label, self.hf_config.vocab_size)
        self.inputs: StepInputBuilder | None = None  # sized once the KV cache is (see allocate_kv_cache)

    # ---- start-up -------------------------------------------------------------------------------
    def initialize(self) -> int:
        """Warm up, size and allocate the KV cache, capture graphs; returns the number of KV blocks.

        Every rank runs this in the same order (warm-up and capture run collectives), and all ranks
        agree on the smallest budget any of them measured.
        """
        if self.backend.measures_peak_memory:
            self.warmup()
        num_blocks = self.backend.kv_cache_budget(self.config, self.device, self.bytes_per_block())
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise RuntimeError(f"backend {self.backend.name!r}: kv_cache_budget() returned {num_blocks!r}, not a "
                               f"number of KV blocks (an int >= 1); set num_kvcache_blocks=N to bypass it, and "
                               f"report it to the backend's authors")
        num_blocks = self.agree_on_num_blocks(num_blocks)
        self.allocate_kv_cache(num_blocks)
        if self.comm.world_size == 1:
            self.warmup_kernels()
            if self.backend.measures_peak_memory:  # the GPU backends: first-use costs of a full-size step
                warm_up_full_steps(self)
        self.capture_graphs()
        return num_blocks

    def agree_on_num_blocks(self, num_blocks: int) -> int:
        if self.comm.world_size == 1:
            return num_blocks
        budget = torch.tensor([num_blocks], dtype=torch.int64, device=self.device)
        budgets = self.comm.gather(budget)
        if budgets is not None:
            budget.fill_(int(budgets.min()))
        return int(self.comm.broadcast(budget).item())

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

    @torch.inference_mode()
    def warmup_kernels(self) -> None:
        """Run a paged prefill, a decode and a sampled step once on the fresh cache, so kernels compiled on first
        use (Triton, torch.compile) are compiled now rather than stalling a real step."""
        from nanovllm.core.scheduler import ScheduledBatch
        from nanovllm.core.sequence import Sequence
        from nanovllm.sampling_params import SamplingParams
        bs, c = self.block_size, self.config
        lengths = [min(3 * bs + 5, c.max_model_len - 1), min(7, c.max_model_len - 1)][:c.max_num_seqs]
        lengths = [n for n in lengths if n > 1]
        if not lengths or sum(-(-n // bs) for n in lengths) > self.num_blocks:
            return
        seqs, next_block = [], 0
        for n in lengths:
            seq = Sequence([0] * n, SamplingParams(temperature=0.7, max_tokens=1))
            seq.block_table = list(range(next_block, next_block + -(-n // bs)))
            next_block += len(seq.block_table)
            seqs.append(seq)
        if len(seqs[0]) > bs:
            seqs[0].num_computed_tokens = bs  # a cached prefix: the paged prefill path
        everyone = [True] * len(seqs)
        prefill = ScheduledBatch(seqs, [len(s) - s.num_computed_tokens for s in seqs], len(seqs), everyone)
        for batch in (prefill, ScheduledBatch(seqs, [1] * len(seqs), 0, everyone)):
            if batch is not prefill:
                for s in seqs:
                    s.num_computed_tokens = len(s) - 1
            logits = self.execute(*self.prepare(batch))
            tokens = check_token_ids(self.kernel_label, self.sampler(logits, self.sampling.tensors(seqs)), len(seqs))
            check_token_range(self.kernel_label, tokens.tolist(), self.hf_config.vocab_size)
        self.sampling.reset()
        self.backend.synchronize(self.device)

    def bytes_per_block(self) -> int:
        layer = self.attention_layers[0]
        return (2 * len(self.attention_layers) * self.block_size * layer.num_kv_heads * layer.head_dim
                * self.kv_dtype.itemsize)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        needed = self.max_num_blocks_per_seq
        if num_blocks < needed:
            raise ValueError(f"the KV cache budget of {num_blocks} blocks of {self.block_size} tokens cannot hold one "
                             f"sequence of max_model_len={self.config.max_model_len} ({needed} blocks needed): raise "
                             f"num_kvcache_blocks (or the memory fraction), or lower max_model_len")
        layer = self.attention_layers[0]
        caches = self.backend.allocate_kv_cache(len(self.attention_layers), num_blocks, self.block_size,
                                                layer.num_kv_heads, layer.head_dim, self.kv_dtype, self.device)
        for attn, (k_cache, v_cache) in zip(self.attention_layers, caches):
            attn.k_cache, attn.v_cache = k_cache, v_cache
        self.num_blocks = num_blocks
        if self.config.max_num_seqs > num_blocks:  # every running sequence holds a block: no more can run at once
            logger.info("max_num_seqs=%d exceeds the %d KV blocks; using %d", self.config.max_num_seqs, num_blocks,
                        num_blocks)
            self.config.max_num_seqs = num_blocks
        # Under TP the step is built on the host, so rank 0 can send it to the workers before copying it.
        build_device = self.device if self.comm.world_size == 1 else torch.device("cpu")
        self.inputs = StepInputBuilder(build_device, self.block_size, self.config.max_num_seqs,
                                       self.max_num_blocks_per_seq, pin=self.backend.pin_memory,
                                       table_multiple=self.backend.block_table_multiple)
        logger.info("KV cache: %d blocks of %d tokens, %s (%.2f GiB)", num_blocks, self.block_size,
                    str(self.kv_dtype).removeprefix("torch."), num_blocks * self.bytes_per_block() / 2**30)
        if is_fp8(self.kv_dtype):
            self.kv_scales = torch.ones(len(self.attention_layers), 2, layer.num_kv_heads, dtype=torch.float32,
                                        device=self.device)
            for attn, scales in zip(self.attention_layers, self.kv_scales):
                attn.kv_scales = (scales[0], scales[1])
            calibrate_kv_scales(self, self.kv_scales, self.config.kv_cache_scale)  # fills them in place

    def capture_graphs(self) -> None:
        if self.config.enforce_eager or not self.backend.supports_graphs:
            return
        if self.plan.wrappers:
            logger.info("device graphs are off: shadow verification (verify_kernels=%d) checks kernel calls on the "
                        "host, which a captured graph would skip; decode runs eagerly", self.config.verify_kernels)
            return
        sizes = [s for s in (1, 2, 4, 8) if s < self.config.max_num_seqs]
        sizes += list(range(16, self.config.max_num_seqs + 1, 16)) or [self.config.max_num_seqs]
        if sizes[-1] != self.config.max_num_seqs:
            sizes.append(self.config.max_num_seqs)
        self.graphs = self.backend.capture_graphs(self, sizes)

    def reset_step_state(self) -> None:
        """Forget what one step hands the next (after a failed step)."""
        self.sampling.reset()

    # ---- one step -------------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
        """The step's inputs and metadata, built once on the host and copied to the device.

        Under TP rank 0 also sends the host copy to the workers here.
        """
        if self.workers is None:
            return self.inputs.build(batch)
        host = self.inputs.build(batch)
        self.workers.send_step(pack_step(host))
        return step_to_device(host, self.device)

    @torch.inference_mode()
    def execute(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata) -> torch.Tensor | None:
        """Logits of the tokens in meta.logits_indices (None on ranks other than 0 under TP)."""
        if self.graphs is not None and meta.prefill is None and self.graphs.can_run(input_ids.numel()):
            return self.graphs.run(input_ids, positions, meta)
        hidden = self.model(input_ids, positions, meta)
        return self.model.compute_logits(hidden[meta.logits_indices])

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: LaunchedStep | None = None) -> LaunchedStep:
        """Start one step on the device and return without waiting for its sampled tokens.

        Sequences whose input token was sampled by `prev` (still in flight) read it from prev's device
        tensor, so the host never waits for it.
        """
        input_ids, positions, meta = self.prepare(batch)
        if prev is not None and prev.rows:
            dst, src = [], []
            for i, seq in enumerate(batch.seqs):
                row = prev.rows.get(seq.seq_id)
                if row is not None and seq.token_ids[seq.num_computed_tokens] == PENDING_TOKEN:
                    dst.append(i), src.append(row)
            if dst:
                index = to_device([dst, src], torch.int64, self.device, self.backend.pin_memory)
                input_ids[index[0]] = prev.tokens[index[1]]
        if self.workers is not None:  # the workers' copy lacks the tokens filled in from `prev`
            self.comm.broadcast(input_ids)
        logits = self.execute(input_ids, positions, meta)
        logits, prompt = split_prompt_logprobs(logits, meta, batch)
        return self.sampling.launch(batch, logits, self.sampler, prompt)

    def wait(self, step: LaunchedStep):
        return self.sampling.wait(step)

    def kernel_label(self, op: str) -> str:
        """Words naming the kernel that runs `op` now and its plugin (for errors about its output)."""
        return kernel_label(self.plan, op)
