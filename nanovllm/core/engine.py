"""Engine: validates and queues requests, and steps scheduler -> model runner -> scheduler until done."""
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from nanovllm.core.config import EngineConfig
from nanovllm.core.detokenizer import IncrementalDetokenizer
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
    def __init__(self, config: EngineConfig, plugins: Plugins | None = None, tokenizer=None):
        """`tokenizer` detokenizes streamed requests and requests with stop strings (None: neither is accepted)."""
        self.config = config
        self.tokenizer = tokenizer
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
        preferences = self.plugins.kernel_preferences(self.backend.name)
        self.kernel_plan = self.plugins.registry.resolve(self.backend.name, query, preferences, config.kernels)
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

    def add_request(self, token_ids: list[int], params: SamplingParams, request_index: int = 0,
                    detokenize: bool = False) -> Sequence:
        """Queue a request. `detokenize` keeps its text up to date token by token (for streaming); requests with
        stop strings always are."""
        self.check_params(params)
        seq = Sequence(token_ids, params, request_index)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device)
            seq.generator.manual_seed(params.seed)
        if detokenize or params.stop_strings:
            if self.tokenizer is None:
                raise ValueError("stop strings and streaming need a tokenizer: create the Engine with tokenizer=...")
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop_strings)
        self.scheduler.add(seq)
        return seq

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: the values bounded by the model's vocabulary."""
        vocab_size = self.config.hf_config.vocab_size
        if params.logprobs is not None and params.logprobs > vocab_size:
            raise ValueError(f"SamplingParams.logprobs={params.logprobs} is invalid: expected at most the "
                             f"vocabulary size {vocab_size}")
        bad = [t for t in params.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"SamplingParams.stop_token_ids has {bad[0]}, outside the vocabulary [0, {vocab_size})")

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop the unfinished sequences among `seqs`, freeing their KV blocks."""
        for seq in seqs:
            self.scheduler.abort(seq)

    def _launch(self, batch, prev=None):
        step = self.runner.launch(batch, prev)
        step.indices = self.scheduler.launch(batch)
        if batch.is_prefill:
            self.stats.num_prefill_tokens += batch.num_tokens
        else:
            self.stats.num_decode_tokens += batch.num_tokens
        return step

    def _commit(self, step) -> list[Sequence]:
        token_ids, logprobs = self.runner.wait(step)
        return self.scheduler.commit(step.batch, step.indices, token_ids, logprobs)

    def step(self) -> list[Sequence]:
        """Schedule, run and commit one step synchronously; returns the sequences that finished in it."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            raise RuntimeError("nothing can be scheduled although requests are waiting; the KV cache is too small")
        return self._commit(self._launch(batch))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def run_to_completion(self, seqs: list[Sequence], use_tqdm: bool = True) -> None:
        """Step until every queued sequence has finished.

        Decode steps are pipelined one deep: step N+1 is scheduled and launched before step N's tokens
        are committed, so host work overlaps device work (`async_scheduling=False` turns this off).
        """
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        in_flight = None
        last = time.perf_counter()
        last_tokens = (0, 0)
        try:
            while self.has_unfinished():
                batch = self.scheduler.schedule(in_flight=in_flight is not None)
                if batch is None or (in_flight is not None and not batch.seqs):
                    bar.update(len(self._commit(in_flight)))
                    in_flight = None
                    continue
                if not batch.seqs:
                    raise RuntimeError("nothing can be scheduled although requests are waiting; "
                                       "the KV cache is too small")
                step = self._launch(batch, in_flight)
                finished = self._commit(in_flight) if in_flight is not None else []
                if self.config.async_scheduling and not batch.is_prefill:
                    in_flight = step
                else:
                    finished += self._commit(step)
                    in_flight = None
                bar.update(len(finished))
                now = time.perf_counter()
                if now - last > 0.5:
                    prefill = (self.stats.num_prefill_tokens - last_tokens[0]) / (now - last)
                    decode = (self.stats.num_decode_tokens - last_tokens[1]) / (now - last)
                    bar.set_postfix_str(f"prefill {prefill:.0f} tok/s, decode {decode:.0f} tok/s", refresh=False)
                    last, last_tokens = now, (self.stats.num_prefill_tokens, self.stats.num_decode_tokens)
            if in_flight is not None:
                bar.update(len(self._commit(in_flight)))
        finally:
            bar.close()


def eos_token_ids(hf_config) -> set[int]:
    eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}
