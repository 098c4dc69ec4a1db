"""AsyncLLM: the engine for asyncio code (the HTTP server, or any async application).

    llm = AsyncLLM(model)
    async for out in llm.generate_async("Hello", SamplingParams(max_tokens=32), request_id="r1"):
        print(out.text, end="")                     # each step's new text
    async for out in llm.generate("Hello", SamplingParams(max_tokens=32), "r2"):
        print(out.outputs[0].text)                  # vLLM's API: the whole RequestOutput so far

It is a client of the same EngineLoop as `LLM` (and can share one: `AsyncLLM(llm=existing_llm)`), so sync and
async callers may use one engine at once. Outputs arrive through an AsyncOutputChannel: the loop thread wakes the
awaiting task once per step, never blocking the event loop.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from nanovllm.beam_search import BeamSearch
from nanovllm.core.engine_loop import EngineRequest, new_request_id
from nanovllm.core.output_channel import AsyncOutputChannel
from nanovllm.outputs import (CompletionOutput, RequestMetrics, RequestOutput, StreamOutput, build_request_output,
                              delta_num_cached_tokens, delta_stop_reason, output_text)
from nanovllm.requests import prompt_texts, prompt_to_ids
from nanovllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams


class AsyncLLM:
    def __init__(self, model: str | None = None, backend: str | None = None, *, llm=None, **options):
        """`AsyncLLM(model, backend, **engine_options)` builds an LLM; `AsyncLLM(llm=llm)` shares an existing one."""
        if llm is None:
            from nanovllm.llm import LLM
            llm = LLM(model, backend, **options)
        self.llm = llm
        self._running: set[str] = set()

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    async def get_tokenizer(self):
        """The model's tokenizer, awaited as vLLM's AsyncLLM.get_tokenizer is (also `self.tokenizer`)."""
        return self.tokenizer

    @property
    def config(self):
        return self.llm.config

    @property
    def engine(self):
        """The engine, for reading its counters; only the engine loop may change it."""
        return self.llm.engine

    def check_request(self, prompt, params: SamplingParams | None, index: int = 0) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids and a snapshot of the params (SamplingParams.clone), validated as `generate`
        validates them (ValueError otherwise, naming the prompt as prompts[index])."""
        self.llm.engine.check_open()
        config = self.llm.config
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams; got {type(params).__name__}")
        params = params.clone()  # the request keeps these values whatever the caller reassigns later
        self.llm.engine.check_params(params)  # clone() validated its fields
        ids = prompt_to_ids(index, prompt, self.tokenizer, config.hf_config.vocab_size, config.max_model_len,
                            params.truncate_prompt_tokens)
        return ids, params

    async def generate_async(self, prompt: str | list[int], params: SamplingParams | None = None,
                             request_id: str | None = None, *, stream: bool = True,
                             prompt_logprobs: int | None = None) -> AsyncIterator[StreamOutput]:
        """Generate for one prompt (text or token ids), yielding StreamOutput pieces as the engine steps (their
        `text`, `token_ids` and `logprobs` are what the step added; a sample's last piece has `finished` and
        `finish_reason`). With `stream=False` one piece comes per sample, holding its whole output.

        With `params.n` > 1 the pieces of the n samples interleave, each naming its `sample_index` (sample i is
        seeded with `params.sample_seed(i)`; the samples share the prompt's KV blocks), and the iteration ends once
        every sample has finished.

        `request_id` (default: a fresh one) names the request for `abort`; it must not be in use. With
        `prompt_logprobs=N` the first piece carries one {token id: logprob} per prompt token (None for the
        first): the prompt token's and the top N. Cancelling the awaiting task, or closing the iterator early
        (`aclose()`), aborts the request and frees its KV blocks.
        """
        ids, params = self.check_request(prompt, params)
        async with aclosing(self._pieces(ids, params, request_id, stream, prompt_logprobs)) as pieces:
            async for piece in pieces:  # closing this iterator closes `pieces` at once: its request is aborted
                yield piece

    async def generate(self, prompt, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """vLLM's `AsyncLLM.generate`: yields the request's RequestOutput (see `LLM.generate`) each time one of
        its samples advances (with n > 1, up to n outputs a step). What an output holds follows
        `SamplingParams.output_kind`, as in vLLM:
        - CUMULATIVE (the default): each sample's whole text, token ids and logprobs so far. Unlike vLLM, whose
          cumulative outputs hold only the sample that advanced, every output holds all n samples (`outputs[i]`,
          some perhaps not started yet).
        - DELTA: only what the step added, for the sample that advanced (`outputs` holds that one sample, with its
          `index`; its cumulative_logprob is the running total).
        - FINAL_ONLY: one output, when every sample has ended, holding them all.
        `finished` is True on the last output only, and `num_cached_tokens` is set once the first sample has
        finished; `metrics` (RequestMetrics) gains first_token_time with the first token, finished_time on the last
        output. An aborted request's last output has finish_reason "abort".
        Cancelling or closing the iteration aborts the request, as with `generate_async`, whose per-step pieces
        this is built from."""
        ids, params = self.check_request(prompt, sampling_params)
        request_id = request_id if request_id is not None else new_request_id("async")
        text = prompt_texts(prompt)[0]
        samples = [CompletionOutput(index=i, text="", token_ids=[], finish_reason=None, stop_reason=None,
                                    logprobs=[] if params.logprobs is not None else None,
                                    cumulative_logprob=0.0 if params.logprobs is not None else None)
                   for i in range(params.n)]
        prompt_logprobs, unfinished, num_cached_tokens = None, params.n, None
        metrics = RequestMetrics(time.monotonic())
        kind = params.output_kind
        async with aclosing(self._pieces(ids, params, request_id, True, None)) as pieces:
            async for piece in pieces:
                sample = samples[piece.sample_index]
                sample["text"] += piece.text
                # new lists, not appends: the outputs already yielded keep what they held
                sample["token_ids"] = sample["token_ids"] + piece.token_ids
                if piece.logprobs is not None:
                    sample["logprobs"] = sample["logprobs"] + piece.logprobs
                    sample["cumulative_logprob"] += sum(lp[t] for t, lp in zip(piece.token_ids, piece.logprobs))
                if piece.prompt_logprobs is not None:
                    prompt_logprobs = piece.prompt_logprobs
                metrics.saw_first_token(piece.first_token_time)
                if piece.finished:
                    sample["finish_reason"], sample["stop_reason"] = piece.finish_reason, piece.stop_reason
                    unfinished -= 1
                    if piece.sample_index == 0:
                        num_cached_tokens = piece.num_cached_tokens
                if kind == RequestOutputKind.FINAL_ONLY and unfinished:
                    continue
                shown_prompt_logprobs = prompt_logprobs
                if kind == RequestOutputKind.DELTA:  # the prompt's logprobs come once, with the first output
                    outputs = [CompletionOutput(sample, text=piece.text, token_ids=list(piece.token_ids),
                                                logprobs=piece.logprobs if params.logprobs is not None else None)]
                    shown_prompt_logprobs, prompt_logprobs = piece.prompt_logprobs, None
                else:
                    outputs = [CompletionOutput(s) for s in samples]
                if not unfinished:
                    metrics.finished_time = time.monotonic()
                yield build_request_output(outputs, request_id, num_cached_tokens, dataclasses.replace(metrics),
                                           prompt=text, prompt_token_ids=ids, prompt_logprobs=shown_prompt_logprobs,
                                           finished=unfinished == 0)

    async def _pieces(self, ids: list[int], params: SamplingParams, request_id: str | None, stream: bool,
                      prompt_logprobs: int | None) -> AsyncIterator[StreamOutput]:
        """generate_async for validated token ids and params (check_request)."""
        if prompt_logprobs is not None and not (isinstance(prompt_logprobs, int) and prompt_logprobs >= 0):
            raise ValueError(f"prompt_logprobs={prompt_logprobs!r} is invalid: expected None or an integer >= 0")
        request_id = request_id if request_id is not None else new_request_id("async")
        if request_id in self._running:
            raise ValueError(f"request_id {request_id!r} is already running; give each request its own id")
        import asyncio
        channel = AsyncOutputChannel(asyncio.get_running_loop())
        has_tokenizer = self.tokenizer is not None
        request = EngineRequest(request_id, ids, params, stream=stream, detokenize=stream and has_tokenizer,
                                prompt_logprobs=prompt_logprobs)
        done = False  # every sample finished
        self._running.add(request_id)
        try:
            self.llm.loop.submit(channel, [request])
            while not done:
                for d in await channel.get_async():
                    done = d.request_finished
                    if stream:
                        yield StreamOutput(0, d.text, d.token_ids, d.finished, d.finish_reason, d.logprobs,
                                           request_id, d.prompt_logprobs, d.first_token_time, d.sample_index,
                                           delta_stop_reason(d), delta_num_cached_tokens(d))
                    elif d.finished:
                        seq = d.seq
                        yield StreamOutput(0, output_text(seq, self.tokenizer), seq.output_token_ids, True,
                                           seq.finish_reason, seq.logprobs if params.logprobs is not None else None,
                                           request_id, d.prompt_logprobs, d.first_token_time, d.sample_index,
                                           delta_stop_reason(d), delta_num_cached_tokens(d))
        finally:
            self._running.discard(request_id)
            if not done and self.llm.loop.alive:  # only this call's request: its id may be another's if refused
                self.llm.loop.abort([request_id], wait=False, channel=channel)

    async def beam_search(self, prompt, request_id: str | None, params: BeamSearchParams
                          ) -> AsyncIterator[RequestOutput]:
        """vLLM's `EngineClient.beam_search`: yields one RequestOutput when the search is over, whose `outputs` are
        the best `params.beam_width` beams, best first (CompletionOutputs: the beam's output `token_ids` and `text`,
        without the prompt; `cumulative_logprob`; `logprobs`, the candidates each step saw; `finish_reason`). Each
        step's one-token requests run concurrently (ids `{request_id}-{step}-{beam}`); cancelling the task aborts
        them."""
        ids = self.check_request(prompt, None)[0]
        request_id = request_id if request_id is not None else new_request_id("beam")
        engine = self.llm.engine
        search = BeamSearch([ids], params, engine.scheduler.eos_token_ids, self.config.max_model_len)

        async def one_token(tokens: list[int], step_id: str) -> dict[int, float]:
            async with aclosing(self._pieces(tokens, search.step_params, step_id, False, None)) as pieces:
                return [piece async for piece in pieces][0].logprobs[0]
        while queries := search.queries():
            step = search.steps_done
            search.advance(await asyncio.gather(*(one_token(q, f"{request_id}-{step}-{j}")
                                                  for j, q in enumerate(queries))))
        (result,) = search.results(None)
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        outputs = [CompletionOutput(index=i, text=decode(beam.tokens[len(ids):]) if decode else "",
                                    token_ids=beam.tokens[len(ids):], finish_reason=beam.finish_reason,
                                    stop_reason=None, logprobs=beam.logprobs, cumulative_logprob=beam.cum_logprob)
                   for i, beam in enumerate(result.sequences)]
        yield build_request_output(outputs, request_id, None, prompt=prompt_texts(prompt)[0], prompt_token_ids=ids,
                                   prompt_logprobs=None, finished=True)

    async def reset_prefix_cache(self) -> bool:
        """LLM.reset_prefix_cache, without blocking the event loop."""
        return await asyncio.to_thread(self.llm.reset_prefix_cache)

    def abort(self, request_id: str) -> None:
        """Abort a running request (no-op for one that finished or is unknown); returns at once, and the engine
        frees its blocks before its next step. Its `generate_async` ends with `finish_reason="abort"`."""
        self.llm.loop.abort([request_id], wait=False)

    def close(self) -> None:
        self.llm.close()
