"""Engine: validates and queues requests, and steps scheduler -> model runner -> scheduler until done."""
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from nanovllm.core.config import EngineConfig
from nanovllm.core.logging import get_logger
from nanovllm.core.model_runner import ModelRunner
from nanovllm.core.parallel import Communicator
from nanovllm.core.plugins import Plugins, load_plugins
from nanovllm.core.registry import KernelQuery
from nanovllm.core.scheduler import Scheduler
from nanovllm.core.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

logger = get_logger(__name__)


@dataclass
class StepStats:
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    seconds: float = 0.0


class Engine:
    def __init__(self, config: EngineConfig, plugins: Plugins | None = None):
        self.config = config
        self.plugins = plugins or load_plugins()
        self.backend = self.plugins.select(config.backend, config.device)
        hf = config.hf_config
        device = self.backend.device(config)
        dtype = config.dtype or self.backend.default_dtype_for(device)
        if dtype not in self.backend.supported_dtypes:
            raise ValueError(f"dtype={dtype} is not supported by backend {self.backend.name!r}; "
                             f"supported: {', '.join(str(d) for d in self.backend.supported_dtypes)}")
        block_size = config.kvcache_block_size or self.backend.default_block_size
        reasons = self.backend.check_block_size(block_size)
        if reasons:
            raise ValueError(f"kvcache_block_size={block_size} cannot be used by backend {self.backend.name!r}: "
                             + "; ".join(reasons))
        max_pos = getattr(hf, "max_position_embeddings", config.max_model_len)
        if config.max_model_len > max_pos:
            logger.info("max_model_len=%d exceeds the model's max_position_embeddings=%d; using %d",
                        config.max_model_len, max_pos, max_pos)
            config.max_model_len = max_pos
        tp = config.tensor_parallel_size
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        query = KernelQuery(device.type, dtype, head_dim, max(1, hf.num_attention_heads // tp),
                            max(1, hf.num_key_value_heads // tp), block_size)
        settings = self.plugins.settings.get("kernels", {}).get(self.backend.name, {})
        self.kernel_plan = self.plugins.registry.resolve(self.backend.name, query, settings, config.kernels)
        logger.info("backend %s, %s, kernels:\n%s", self.backend.name, dtype, self.kernel_plan.table())
        if tp > 1:
            if self.backend.dist_backend is None:  # the backend refuses TP: its communicator raises the reason
                self.backend.communicator(0, tp, "")
            raise ValueError("tensor_parallel_size > 1 is not supported yet")
        comm = self.backend.communicator(0, 1, "")
        self.runner = ModelRunner(config, self.backend, self.kernel_plan, comm, dtype, block_size)
        if self.backend.measures_peak_memory:
            self.runner.warmup()
        num_blocks = self.backend.kv_cache_budget(config, self.runner.device, self.runner.bytes_per_block())
        self.runner.allocate_kv_cache(num_blocks)
        self.runner.capture_graphs()
        self.scheduler = Scheduler(config, num_blocks, block_size, eos_token_ids(hf))
        self.stats = StepStats()

    def add_request(self, token_ids: list[int], params: SamplingParams, request_index: int = 0) -> Sequence:
        seq = Sequence(token_ids, params, request_index)
        seq.generator = None
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device)
            seq.generator.manual_seed(params.seed)
        self.scheduler.add(seq)
        return seq

    def step(self) -> list[Sequence]:
        """Schedule, run and post-process one step; returns the sequences that finished in it."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        token_ids = self.runner.run(batch)
        finished = self.scheduler.postprocess(batch, token_ids)
        if batch.is_prefill:
            self.stats.num_prefill_tokens += batch.num_tokens
        else:
            self.stats.num_decode_tokens += batch.num_tokens
        self.stats.seconds += time.perf_counter() - start
        return finished

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def run_to_completion(self, seqs: list[Sequence], use_tqdm: bool = True) -> None:
        """Step until every sequence in `seqs` (and anything else queued) has finished."""
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        try:
            while self.has_unfinished():
                t = time.perf_counter()
                before = (self.stats.num_prefill_tokens, self.stats.num_decode_tokens)
                finished = self.step()
                dt = time.perf_counter() - t
                if self.stats.num_prefill_tokens > before[0]:
                    prefill_tps = (self.stats.num_prefill_tokens - before[0]) / dt
                else:
                    decode_tps = (self.stats.num_decode_tokens - before[1]) / dt
                bar.set_postfix_str(f"prefill {prefill_tps:.0f} tok/s, decode {decode_tps:.0f} tok/s", refresh=False)
                bar.update(len(finished))
        finally:
            bar.close()


def eos_token_ids(hf_config) -> set[int]:
    eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}
