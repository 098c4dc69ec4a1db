"""Engine: validates and queues requests, and steps scheduler -> model runner -> scheduler until done."""
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass

import torch

from nanovllm.core.config import EngineConfig
from nanovllm.core.detokenizer import IncrementalDetokenizer
from nanovllm.core.gc_freeze import START_UP_FREEZE
from nanovllm.core.sampling.generation_config import read_generation_config
from nanovllm.core.request_checks import bad_word_token_ids, check_request_params
from nanovllm.core.sampling.structured import StructuredCompiler
from nanovllm.core.logging import get_logger
from nanovllm.core.model_runner import ModelRunner
from nanovllm.core.runner_setup import set_up
from nanovllm.core.plugins import Plugins, load_plugins
from nanovllm.core.progress import GenerationProgress
from nanovllm.core.registry import KernelPlan
from nanovllm.core.shadow import current_plan
from nanovllm.core.scheduler import Scheduler
from nanovllm.core.sequence import Sequence
from nanovllm.core.startup import pinned, resolve, with_verification
from nanovllm.core.parallel.checks import check_tensor_parallel
from nanovllm.core.parallel.worker_group import WorkerGroup
from nanovllm.sampling_params import SamplingParams

logger = get_logger(__name__)


@dataclass
class StepStats:
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0


class Engine:
    def __init__(self, config: EngineConfig, plugins: Plugins | None = None, tokenizer=None):
        """`tokenizer` detokenizes streamed requests and requests with stop strings (None: neither is accepted)."""
        self.config = config
        self.tokenizer = tokenizer
        self.model_defaults, generation_eos = read_generation_config(config.model, config.generation_config)
        self.plugins = plugins or load_plugins()
        self.resolved = with_verification(resolve(config, self.plugins), self.plugins, config.verify_kernels)
        self.backend = self.resolved.backend
        # the one value start-up changes in the config: the model's limit caps max_model_len (logged by resolve)
        config.max_model_len = self.resolved.max_model_len
        tp = config.tensor_parallel_size
        self.workers, self.comm = None, None
        self.closed_reason: str | None = None  # why the engine refuses work, once it does
        if tp > 1:
            check_tensor_parallel(config, self.backend)
            self.workers = WorkerGroup(config, pinned(self.resolved), tp)
        try:
            if self.workers is not None:
                self.workers.wait_until_ready()
            self.comm = self._watched(self.backend.communicator, 0, tp,
                                      self.workers.init_method if self.workers else "")
            self.runner = self._watched(ModelRunner, config, self.resolved, self.comm, self.workers)
            num_blocks = self._watched(set_up, self.runner)
        except BaseException as e:
            self._fail(e)
            raise
        self.scheduler = Scheduler(config, num_blocks, self.resolved.block_size,
                                   eos_token_ids(config.hf_config) | generation_eos)
        self._structured: StructuredCompiler | None = None
        self.stats = StepStats()
        self._in_flight = None  # the launched step whose tokens are not committed yet (pipelined decode)
        self._gc_freeze = START_UP_FREEZE  # kept: close() may run at exit, after module globals are cleared
        self._gc_freeze.freeze()  # no full collection of start-up's objects in the middle of a step

    @property
    def kernel_plan(self) -> KernelPlan:
        """The kernels this engine runs: the resolved plan, with shadow verification's demotions (if any)."""
        return current_plan(self.resolved.plan)

    def _watched(self, fn, *args):
        """fn(*args); under tensor parallelism on rank 0's step thread, waited for while the workers are watched
        (a worker that dies or stops fails the wait within seconds, and Ctrl-C interrupts it)."""
        return fn(*args) if self.workers is None else self.workers.watch(fn, *args)

    def interrupt(self) -> None:
        """A caller's Ctrl-C (from any thread): under tensor parallelism, a wait on the workers in progress ends at
        once with KeyboardInterrupt, so the caller's abort is not held up by a worker that stopped answering."""
        if self.workers is not None:
            self.workers.interrupt()

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
        freeze, self._gc_freeze = getattr(self, "_gc_freeze", None), None
        if freeze is not None:
            freeze.release()
        if self.workers is not None:
            self.workers.close(graceful)
        if self.comm is not None:
            self.comm.close()

    def add_request(self, token_ids: list[int], params: SamplingParams, detokenize: bool = False,
                    checked: bool = False) -> Sequence:
        """Queue a request; returns its first sample, whose `group` lists all `params.n` samples. `detokenize`
        keeps the text up to date token by token (for streaming); requests with stop strings always are.
        `checked`: the caller validated this very object and ran `check_params(params, detokenize)` on it, and no
        one else holds it (the engine loop's requests: `LLM` and `AsyncLLM` check a clone before they submit), so
        it is not checked again; fields the model's defaults fill in are.

        Fields the request left unset take the model's generation_config.json defaults first. Sample i is seeded
        with `params.sample_seed(i)` (seed + i). Only the first sample is queued now: the others follow once its
        prompt is computed, and share its prompt's KV blocks through the prefix cache."""
        self.check_open()
        given, params = params, params.with_model_defaults(self.model_defaults)  # a copy validates itself
        if params is given and not checked:
            params.validate()  # fields may have been reassigned since construction
        if params is not given or not checked:
            self.check_params(params, detokenize)
        samples = [self._new_sample(token_ids, params, i, detokenize) for i in range(params.n)]
        for i, sample in enumerate(samples):
            sample.group, sample.sample_index = samples, i
        samples[0].deferred_samples = samples[1:]
        for sample in samples:
            self.scheduler.add(sample, queue=sample is samples[0])
        return samples[0]

    def _new_sample(self, token_ids: list[int], params: SamplingParams, index: int, detokenize: bool) -> Sequence:
        seq = Sequence(token_ids, params)
        seed = params.sample_seed(index)
        if seed is not None:
            seq.generator = torch.Generator(device=self.runner.device)
            seq.generator.manual_seed(seed)
        if params.detokenize and (detokenize or params.stop_strings):
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop_strings, params.skip_special_tokens,
                                                     params.include_stop_str_in_output)
        seq.bad_word_ids = bad_word_token_ids(params.bad_words, self.tokenizer)
        if params.structured is not None:
            seq.structured = self.structured_compiler().new_state(params.structured)
        return seq

    def check_open(self) -> None:
        """RuntimeError once the engine is shut down (closed, or a tensor-parallel step failed)."""
        if self.closed_reason is not None:
            raise RuntimeError(f"the engine is shut down ({self.closed_reason}); create a new LLM")

    def check_params(self, params: SamplingParams, detokenize: bool = False) -> None:
        """What validated `params` (a fresh `clone()`, or just `validate()`d) cannot check alone: values the
        vocabulary bounds, settings that need a tokenizer (stop strings, streaming with `detokenize`, bad words as
        text) and a structured-output constraint, compiled now so that one that cannot be is refused before any
        work (see core/request_checks.py)."""
        check_request_params(params, self.config.hf_config.vocab_size, self.tokenizer is not None, detokenize)
        if params.structured is not None:
            self.structured_compiler().compile(params.structured)

    def structured_compiler(self) -> StructuredCompiler:
        if self._structured is None:
            self._structured = StructuredCompiler(self.tokenizer, self.config.hf_config.vocab_size,
                                                  self.scheduler.eos_token_ids)
        return self._structured

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop the unfinished sequences among `seqs`, freeing their KV blocks."""
        for seq in seqs:
            for sample in seq.group:
                self.scheduler.abort(sample)

    def _launch(self, batch, prev=None):
        try:
            step = self._watched(self.runner.launch, batch, prev)
        except BaseException as e:
            if self.workers is not None:  # a half-run step leaves the workers inside a collective
                self._fail(e)
            if prev is not None and isinstance(e, Exception):
                self._raise_if_failed(prev, e)
            raise
        step.indices = self.scheduler.launch(batch)
        if batch.is_prefill:
            self.stats.num_prefill_tokens += batch.num_tokens
        else:
            self.stats.num_decode_tokens += batch.num_tokens
        return step

    def _raise_if_failed(self, prev, error: Exception) -> None:
        """A step that failed to launch behind `prev` may have failed because of prev's output (its tokens are
        the new step's inputs, checked only when prev is committed): raise prev's own error, naming its kernel,
        when it has one."""
        try:
            self.runner.wait(prev)
        except Exception as cause:
            raise cause from error

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
        self._in_flight = None
        num_aborted = self.scheduler.abort_all()  # never raises, trusts nothing the failure may have broken
        self.runner.reset_step_state()
        logger.warning("a step raised %s; aborted %d unfinished request(s)%s", type(error).__name__, num_aborted,
                       "" if self.closed_reason else "; the engine is idle and usable")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_work(self) -> bool:
        """Requests queued or running, or a launched step whose tokens are not committed yet."""
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def pipelined_step(self) -> list:
        """One turn of the pipelined loop; returns the batches committed in it (their tokens are on the host).

        Steps are pipelined one deep: step N+1 is scheduled and launched before step N's tokens are committed
        (see `Scheduler.schedule` for what may run behind what), so host work overlaps device work
        (`async_scheduling=False` turns this off). With nothing left to launch, the step in flight is committed.
        If anything raises, every unfinished request is aborted first (see `_recover`), leaving the engine idle and
        usable, and the exception propagates.
        """
        self.check_open()
        in_flight = self._in_flight
        try:
            batch = (self.scheduler.schedule(in_flight=None if in_flight is None else in_flight.batch)
                     if self.has_unfinished() else None)
            if batch is None or (in_flight is not None and not batch.seqs):
                self._in_flight = None
                return [] if in_flight is None else [self._commit_batch(in_flight)]
            if not batch.seqs:
                raise RuntimeError("nothing can be scheduled although requests are waiting; the KV cache is too "
                                   "small")
            step = self._launch(batch, in_flight)
            self._in_flight = None
            committed = [] if in_flight is None else [self._commit_batch(in_flight)]
            if self.config.async_scheduling:
                self._in_flight = step
            else:
                committed.append(self._commit_batch(step))
            return committed
        except BaseException as e:
            self._in_flight = None
            self._recover(e)
            raise

    def _commit_batch(self, step):
        self._commit(step)
        return step.batch

    def planned_output_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """The most output tokens a request can produce: max_tokens, or the room max_model_len leaves."""
        return min(params.max_tokens, self.config.max_model_len - num_prompt_tokens)

    def run_to_completion(self, seqs: list[Sequence], use_tqdm: bool | Callable = True) -> None:
        """Step (pipelined) until no work is left, with a progress bar over the output tokens of `seqs`. For a
        caller that owns the engine alone; `LLM` runs the engine through its EngineLoop instead."""
        planned = {s.seq_id: self.planned_output_tokens(s.num_prompt_tokens, s.params) for s in seqs}
        progress = GenerationProgress(sum(planned.values()), len(seqs), sum(s.num_prompt_tokens for s in seqs),
                                      use_tqdm)
        counted, done = 0, set()
        with closing(progress):
            while self.has_work():
                self.pipelined_step()
                output_tokens = sum(s.num_output_tokens - s.num_pending for s in seqs)
                finished = [s for s in seqs if s.is_finished and s.seq_id not in done]
                done.update(s.seq_id for s in finished)
                progress.advance(output_tokens - counted, sum(s.num_prompt_tokens for s in finished),
                                 [planned[s.seq_id] - s.num_output_tokens for s in finished])
                counted = output_tokens


def eos_token_ids(hf_config) -> set[int]:
    eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}
