"""Start-up of a ModelRunner: the model, the KV cache, the warm-ups and the device graphs.

Every rank (rank 0 and each TP worker) runs the same path, in the same order, since the warm-ups and
the graph capture run collectives:

1. `build_model` (called by ModelRunner.__init__): construct the model on the backend's device with
   the plan's kernels, load its weights (or dummy ones), let the backend prepare it
   (`Backend.prepare_model`), decide on fusing small ops.
2. `set_up(runner)`: a prefill without a cache when the backend measures peak memory (`measure_peak`),
   the KV budget from the backend, the smallest budget of all ranks (`agree_on_num_blocks`), the KV
   cache allocated and bound to the attention layers (`allocate_kv_cache`), the kernels compiled by a
   real paged prefill + decode + sample (`warm_up_kernels`), on GPU backends a full-size prefill
   (`core/warmup_steps.py`), the backend's own warm-up (`Backend.warm_up`), and the decode graphs
   (`capture_graphs`).

This is the only module of the core that imports `nanovllm.models` to build a model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from nanovllm.core.config import EngineConfig
from nanovllm.core.kernel_output import check_token_ids, check_token_range
from nanovllm.core.kv_calibration import calibrate_kv_scales
from nanovllm.core.kv_quant import is_fp8
from nanovllm.core.logging import get_logger
from nanovllm.core.parallel.communicator import Communicator
from nanovllm.core.startup import Resolved
from nanovllm.core.step_inputs import StepInputBuilder
from nanovllm.core.step_metadata import PrefillMetadata, StepMetadata
from nanovllm.core.warmup_steps import warm_up_full_steps, warm_up_longest_context
from nanovllm.models.fusion import fuse_small_ops
from nanovllm.models.layers.context import LayerContext
from nanovllm.models.loader import load_model
from nanovllm.models.registry import model_class

if TYPE_CHECKING:
    from nanovllm.core.model_runner import ModelRunner

logger = get_logger(__name__)


# ---- the model ----------------------------------------------------------------------------------
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


def build_model(config: EngineConfig, resolved: Resolved, comm: Communicator, device: torch.device,
                kernel_label: Callable[[str], str]) -> torch.nn.Module:
    """The model on `device`, built with the plan's kernels, its weights loaded, prepared by the backend (e.g.
    weights packed once) and small ops fused if asked."""
    backend, plan, hf_config = resolved.backend, resolved.plan, config.hf_config
    backend.configure_process(config)
    backend.seed(config.seed)
    default_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(resolved.dtype)
        with torch.device(device):
            kernels = plan.model_kernels()
            model = model_class(hf_config)(hf_config, LayerContext(comm, kernels, kernel_label))
    finally:
        torch.set_default_dtype(default_dtype)
    if config.load_format == "dummy":
        init_dummy_weights(model, config.seed)
    else:
        load_model(model, config.model)
    backend.prepare_model(model, resolved.dtype)
    if config.compile if config.compile is not None else backend.compile_small_ops:
        fuse_small_ops(model, plan)
    return model


# ---- the KV cache, warm-ups and graphs ----------------------------------------------------------
def set_up(runner: ModelRunner) -> int:
    """Warm up, size and allocate the KV cache, capture graphs; returns the number of KV blocks.

    Every rank runs this in the same order (warm-up and capture run collectives), and all ranks
    agree on the smallest budget any of them measured.
    """
    backend = runner.backend
    if backend.measures_peak_memory:
        measure_peak(runner)
    num_blocks = backend.kv_cache_budget(runner.config, runner.device, bytes_per_block(runner))
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise RuntimeError(f"backend {backend.name!r}: kv_cache_budget() returned {num_blocks!r}, not a "
                           f"number of KV blocks (an int >= 1); set num_kvcache_blocks=N to bypass it, and "
                           f"report it to the backend's authors")
    num_blocks = agree_on_num_blocks(runner.comm, runner.device, num_blocks)
    allocate_kv_cache(runner, num_blocks)
    if runner.comm.world_size == 1:
        warm_up_kernels(runner)
        if backend.measures_peak_memory:  # the GPU backends: first-use costs of a full-size step
            warm_up_full_steps(runner)
            warm_up_longest_context(runner)
    backend.warm_up(runner)
    capture_graphs(runner)
    return num_blocks


def agree_on_num_blocks(comm: Communicator, device: torch.device, num_blocks: int) -> int:
    """The smallest budget of all ranks (each rank measured its own)."""
    if comm.world_size == 1:
        return num_blocks
    budget = torch.tensor([num_blocks], dtype=torch.int64, device=device)
    budgets = comm.gather(budget)
    if budgets is not None:
        budget.fill_(int(budgets.min()))
    return int(comm.broadcast(budget).item())


def measure_peak(runner: ModelRunner) -> None:
    """Run the largest prefill once without a cache, so the backend can measure peak memory."""
    c, device = runner.config, runner.device
    num_seqs = max(1, min(c.max_num_seqs, c.max_num_batched_tokens // c.max_model_len))
    seq_len = min(c.max_model_len, c.max_num_batched_tokens // num_seqs)
    n = num_seqs * seq_len
    cu = torch.arange(0, n + 1, seq_len, dtype=torch.int32, device=device)
    meta = StepMetadata(slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=device),
                        num_prefill_tokens=n, prefill=PrefillMetadata(cu, cu, seq_len, seq_len), decode=None,
                        logits_indices=cu[1:].long() - 1)
    input_ids = torch.zeros(n, dtype=torch.int64, device=device)
    positions = torch.arange(seq_len, device=device).repeat(num_seqs)
    runner.execute(input_ids, positions, meta)
    runner.backend.synchronize(device)


@torch.inference_mode()
def warm_up_kernels(runner: ModelRunner) -> None:
    """Run a paged prefill, a decode and a sampled step once on the fresh cache, so kernels compiled on first
    use (Triton, torch.compile) are compiled now rather than stalling a real step."""
    from nanovllm.core.scheduler import ScheduledBatch
    from nanovllm.core.sequence import Sequence
    from nanovllm.sampling_params import SamplingParams
    bs, c = runner.block_size, runner.config
    lengths = [min(3 * bs + 5, c.max_model_len - 1), min(7, c.max_model_len - 1)][:c.max_num_seqs]
    lengths = [n for n in lengths if n > 1]
    if not lengths or sum(-(-n // bs) for n in lengths) > runner.num_blocks:
        return
    seqs, next_block = [], 0
    for n in lengths:
        seq = Sequence([0] * n, SamplingParams(temperature=0.7, max_tokens=1))
        seq.block_table = list(range(next_block, next_block + -(-n // bs)))
        next_block += len(seq.block_table)
        seqs.append(seq)
    if len(seqs[0]) > bs:
        # a cached prefix (the paged prefill path): compute it first, so the paged step reads K/V, not whatever
        # the fresh cache memory holds
        runner.execute(*runner.prepare(ScheduledBatch([seqs[0]], [bs], 1, [False]))[:3])
        seqs[0].num_computed_tokens = bs
    everyone = [True] * len(seqs)
    prefill = ScheduledBatch(seqs, [len(s) - s.num_computed_tokens for s in seqs], len(seqs), everyone)
    for batch in (prefill, ScheduledBatch(seqs, [1] * len(seqs), 0, everyone)):
        if batch is not prefill:
            for s in seqs:
                s.num_computed_tokens = len(s) - 1
        logits = runner.execute(*runner.prepare(batch)[:3])
        tokens = check_token_ids(runner.kernel_label, runner.sampler(logits, runner.sampling.tensors(seqs)), len(seqs))
        check_token_range(runner.kernel_label, tokens.tolist(), runner.hf_config.vocab_size)
    runner.sampling.reset()
    runner.backend.synchronize(runner.device)


def bytes_per_block(runner: ModelRunner) -> int:
    """Bytes of one KV block over all attention layers (K and V)."""
    layer = runner.attention_layers[0]
    return (2 * len(runner.attention_layers) * runner.block_size * layer.num_kv_heads * layer.head_dim
            * runner.kv_dtype.itemsize)


def allocate_kv_cache(runner: ModelRunner, num_blocks: int) -> None:
    """Allocate the KV cache, bind it (and FP8 scales) to the attention layers, size the step input builder."""
    config, layers = runner.config, runner.attention_layers
    needed = runner.max_num_blocks_per_seq
    if num_blocks < needed:
        raise ValueError(f"the KV cache budget of {num_blocks} blocks of {runner.block_size} tokens cannot hold one "
                         f"sequence of max_model_len={config.max_model_len} ({needed} blocks needed): raise "
                         f"num_kvcache_blocks (or the memory fraction), or lower max_model_len")
    layer = layers[0]
    caches = runner.backend.allocate_kv_cache(len(layers), num_blocks, runner.block_size,
                                              layer.num_kv_heads, layer.head_dim, runner.kv_dtype, runner.device)
    for attn, (k_cache, v_cache) in zip(layers, caches):
        attn.k_cache, attn.v_cache = k_cache, v_cache
    runner.num_blocks = num_blocks
    if config.max_num_seqs > num_blocks:  # every running sequence holds a block: no more can run at once
        logger.info("max_num_seqs=%d exceeds the %d KV blocks; using %d", config.max_num_seqs, num_blocks,
                    num_blocks)
        config.max_num_seqs = num_blocks
    # Under TP the step is built on the host, so rank 0 can send it to the workers before copying it.
    build_device = runner.device if runner.comm.world_size == 1 else torch.device("cpu")
    runner.inputs = StepInputBuilder(build_device, runner.block_size, config.max_num_seqs,
                                     runner.max_num_blocks_per_seq, pin=runner.backend.pin_memory,
                                     table_multiple=runner.backend.block_table_multiple,
                                     device_record=runner.backend.supports_graphs)
    if runner.inputs.records is not None:
        runner.inputs.copier = runner.backend.record_copier(runner.device)
    logger.info("KV cache: %d blocks of %d tokens, %s (%.2f GiB)", num_blocks, runner.block_size,
                str(runner.kv_dtype).removeprefix("torch."), num_blocks * bytes_per_block(runner) / 2**30)
    if is_fp8(runner.kv_dtype):
        runner.kv_scales = torch.ones(len(layers), 2, layer.num_kv_heads, dtype=torch.float32,
                                      device=runner.device)
        for attn, scales in zip(layers, runner.kv_scales):
            attn.kv_scales = (scales[0], scales[1])
        calibrate_kv_scales(runner, runner.kv_scales, config.kv_cache_scale)  # fills them in place


def graph_sizes(max_num_seqs: int) -> list[int]:
    """The decode batch sizes to capture: 1, 2, 4, 8, then every 16, and max_num_seqs itself."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16)) or [max_num_seqs]
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def capture_graphs(runner: ModelRunner) -> None:
    """Let the backend capture decode graphs (runner.graphs), unless eager mode or shadow verification is on."""
    if runner.config.enforce_eager or not runner.backend.supports_graphs:
        return
    if runner.plan.wrappers:
        logger.info("device graphs are off: shadow verification (verify_kernels=%d) checks kernel calls on the "
                    "host, which a captured graph would skip; decode runs eagerly", runner.config.verify_kernels)
        return
    sizes = graph_sizes(runner.config.max_num_seqs)
    runner.graphs = runner.backend.capture_graphs(runner, sizes)
    if runner.graphs is not None:
        runner.logit_row_sizes = sizes  # capture ran the LM head at each (model_runner.padded_rows)
