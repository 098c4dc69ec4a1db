"""Engine: validates and queues requests, and steps scheduler -> model runner -> scheduler until done."""
import dataclasses
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from nanovllm.core.config import EngineConfig
from nanovllm.core.detokenizer import IncrementalDetokenizer
from nanovllm.core.logging import get_logger
from nanovllm.core.model_runner import ModelRunner
from nanovllm.core.plugins import Plugins, load_plugins
from nanovllm.core.kernel_plan_io import load_plan
from nanovllm.core.registry import KernelPlan, KernelQuery
from nanovllm.core.shadow import install_shadow_verification
from nanovllm.core.scheduler import Scheduler
from nanovllm.core.sequence import Sequence
from nanovllm.core.tensor_parallel import check_tensor_parallel
from nanovllm.core.worker_group import WorkerGroup
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
        self.backend, dtype, block_size, self.kernel_plan = resolve_backend(config, self.plugins)
        tp = config.tensor_parallel_size
        self.workers, self.comm = None, None
        self.closed_reason: str | None = None  # why the engine refuses work, once it does
        if tp > 1:
            check_tensor_parallel(config, self.backend)
            self.workers = WorkerGroup(config, self.backend.name, tp)
        try:
            if self.workers is not None:
                self.workers.wait_until_ready()
            self.comm = self._watched(self.backend.communicator, 0, tp,
                                      self.workers.init_method if self.workers else "")
            self.runner = self._watched(ModelRunner, config, self.backend, self.kernel_plan, self.comm, dtype,
                                        block_size, self.workers)
            num_blocks = self._watched(self.runner.initialize)
        except BaseException as e:
            self._fail(e)
            raise
        self.scheduler = Scheduler(config, num_blocks, block_size, eos_token_ids(config.hf_config))
        self.stats = StepStats()

    def _watched(self, fn, *args):
        """fn(*args); under tensor parallelism on rank 0's step thread, waited for while the workers are watched
        (a worker that dies or stops fails the wait within seconds, and Ctrl-C interrupts it)."""
        return fn(*args) if self.workers is None else self.workers.watch(fn, *args)

    def _fail(self, error: BaseException) -> None:
        """Shut everything down after `error`; raise RuntimeError instead if a worker's death caused it."""
        death = self.workers.death_error(error) if self.workers is not None else None
        self.closed_reason = f"a step failed with {type(error).__name__}: {error}"
        self.close(graceful=False)
        if death is not None:
            raise death from error

    def close(self, graceful: bool = True) -> None:
        """Stop the tensor-parallel workers and leave the process group; safe to call twice. The engine then
        refuses work with a RuntimeError."""
        if self.closed_reason is None:
            self.closed_reason = "close() was called"
        if self.workers is not None:
            self.workers.close(graceful)
        if self.comm is not None:
            self.comm.close()

    def add_request(self, token_ids: list[int], params: SamplingParams, request_index: int = 0,
                    detokenize: bool = False) -> Sequence:
        """Queue a request. `detokenize` keeps its text up to date token by token (for streaming); requests with
        stop strings always are."""
        seq = self.new_sequence(token_ids, params, request_index, detokenize)
        self.scheduler.add(seq)
        return seq

    def new_sequence(self, token_ids: list[int], params: SamplingParams, request_index: int = 0,
                     detokenize: bool = False) -> Sequence:
        """A request's Sequence, not queued yet (`scheduler.add` queues it): building it touches no engine state,
        so a caller can build a whole call's sequences before queueing any."""
        self.check_open()
        self.check_params(params, detokenize)
        seq = Sequence(token_ids, params, request_index)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device)
            seq.generator.manual_seed(params.seed)
        if detokenize or params.stop_strings:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop_strings)
        return seq

    def run_requests(self, seqs: list[Sequence], use_tqdm: bool = True) -> None:
        """Queue `seqs` and step until all have finished. If anything raises, even while queueing, none of them
        stays queued or running."""
        try:
            for seq in seqs:
                self.scheduler.add(seq)
            self.run_to_completion(seqs, use_tqdm)
        except BaseException:
            self.abort(seqs)
            raise

    def check_open(self) -> None:
        """RuntimeError once the engine is shut down (closed, or a tensor-parallel step failed)."""
        if self.closed_reason is not None:
            raise RuntimeError(f"the engine is shut down ({self.closed_reason}); create a new LLM")

    def check_params(self, params: SamplingParams, detokenize: bool = False) -> None:
        """What SamplingParams cannot check alone: the values bounded by the model's vocabulary, and whether
        stop strings (or streaming, `detokenize`) have a tokenizer to detokenize with."""
        if (detokenize or params.stop_strings) and self.tokenizer is None:
            raise ValueError("stop strings and streaming need a tokenizer, and this engine has none "
                             "(skip_tokenizer_init=True): drop SamplingParams.stop, or create the LLM with a tokenizer")
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
        try:
            step = self._watched(self.runner.launch, batch, prev)
        except BaseException as e:
            if self.workers is not None:  # a half-run step leaves the workers inside a collective
                self._fail(e)
            raise
        step.indices = self.scheduler.launch(batch)
        if batch.is_prefill:
            self.stats.num_prefill_tokens += batch.num_tokens
        else:
            self.stats.num_decode_tokens += batch.num_tokens
        return step

    def _commit(self, step) -> list[Sequence]:
        try:
            token_ids, logprobs = self._watched(self.runner.wait, step)
        except BaseException as e:
            if self.workers is not None:
                self._fail(e)
            raise
        return self.scheduler.commit(step.batch, step.indices, token_ids, logprobs)

    def step(self) -> list[Sequence]:
        """Schedule, run and commit one step synchronously; returns the sequences that finished in it.

        If anything raises, every unfinished request is aborted first (see `_recover`)."""
        self.check_open()
        try:
            batch = self.scheduler.schedule()
            if not batch.seqs:
                raise RuntimeError("nothing can be scheduled although requests are waiting; the KV cache is too "
                                   "small")
            return self._commit(self._launch(batch))
        except BaseException as e:
            self._recover(e)
            raise

    def _recover(self, error: BaseException) -> None:
        """After `error` inside a step: abort every unfinished request (freeing its KV blocks, dropping its
        in-flight placeholders) and forget per-step state, so the engine is idle and consistent again and the
        next call starts clean. Blocks in the prefix cache stay valid: only fully computed, committed blocks
        are ever entered there. The caller re-raises `error`."""
        num_aborted = self.scheduler.abort_all()  # never raises, trusts nothing the failure may have broken
        self.runner.reset_step_state()
        logger.warning("a step raised %s; aborted %d unfinished request(s)%s", type(error).__name__, num_aborted,
                       "" if self.closed_reason else "; the engine is idle and usable")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def run_to_completion(self, seqs: list[Sequence], use_tqdm: bool = True) -> None:
        """Step until every queued sequence has finished. If anything raises (a kernel, Ctrl-C), every
        unfinished request is aborted before the exception propagates, leaving the engine idle and usable.

        Decode steps are pipelined one deep: step N+1 is scheduled and launched before step N's tokens
        are committed, so host work overlaps device work (`async_scheduling=False` turns this off).
        """
        self.check_open()
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
        except BaseException as e:
            self._recover(e)
            raise
        finally:
            bar.close()


def resolve_backend(config: EngineConfig, plugins: Plugins):
    """(backend, dtype, KV block size, kernel plan) for this config; raises naming any value that cannot serve.

    With `config.kernel_plan` every op is pinned to the saved plan's kernel; with `config.verify_kernels` the
    plan's functions are wrapped for shadow verification (`core/shadow.py`).
    """
    replay = None
    if config.kernel_plan is not None:
        replay = load_plan(config.kernel_plan)
        if config.backend not in (None, replay[0]):
            raise ValueError(f"kernel plan {config.kernel_plan!r} was saved for backend {replay[0]!r}, but backend="
                             f"{config.backend!r} was asked for: drop one, or save a plan for {config.backend!r}")
        config.backend = replay[0]
    backend = plugins.select(config.backend, config.device)
    hf = config.hf_config
    device_type = torch.device(config.device).type if config.device else backend.device_type
    dtype = config.dtype or backend.default_dtype_for(torch.device(device_type))
    if dtype not in backend.supported_dtypes:
        raise ValueError(f"dtype={dtype} is not supported by backend {backend.name!r}; "
                         f"supported: {', '.join(str(d) for d in backend.supported_dtypes)}")
    block_size = config.kvcache_block_size or backend.default_block_size
    reasons = backend.check_block_size(block_size)
    if reasons:
        raise ValueError(f"kvcache_block_size={block_size} cannot be used by backend {backend.name!r}: "
                         + "; ".join(reasons))
    max_pos = getattr(hf, "max_position_embeddings", config.max_model_len)
    if config.max_model_len > max_pos:
        logger.info("max_model_len=%d exceeds the model's max_position_embeddings=%d; using %d",
                    config.max_model_len, max_pos, max_pos)
        config.max_model_len = max_pos
    tp = config.tensor_parallel_size
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    query = KernelQuery(device_type, dtype, head_dim, max(1, hf.num_attention_heads // tp),
                        max(1, hf.num_key_value_heads // tp), block_size)
    preferences, notes = plugins.kernel_preferences(backend.name), plugins.preference_notes(backend.name)
    try:
        plan = plugins.registry.resolve(backend.name, query, preferences, replay[1] if replay else config.kernels,
                                        notes=notes)
    except (ValueError, RuntimeError) as e:
        if replay is None:
            raise
        raise ValueError(f"kernel plan {config.kernel_plan!r} cannot be honoured: {e}") from None
    if replay is not None:
        plan = replay_as_saved(plan, config.kernel_plan)
    if config.verify_kernels:
        install_shadow_verification(plan, plugins.registry, config.verify_kernels, lambda op, excluded: (
            plugins.registry.resolve(backend.name, query, preferences, ops=[op], notes=notes,
                                     exclude=excluded).choices[op]))
    logger.info("backend %s, %s, kernels:\n%s", backend.name, dtype, plan.table())
    return backend, dtype, block_size, plan


def replay_as_saved(plan: KernelPlan, path: str) -> KernelPlan:
    """The plan with each op's reason saying it was pinned by the saved plan."""
    choices = {op: dataclasses.replace(c, why=f"pinned by kernel plan {path}") for op, c in plan.choices.items()}
    return KernelPlan(plan.backend, choices, plan.query)


def eos_token_ids(hf_config) -> set[int]:
    eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}
