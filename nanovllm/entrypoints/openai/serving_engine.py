"""What every endpoint shares: the model check, request fields -> SamplingParams (the one place), running a
request on the engine with its metrics, merging several requests' streams, and token strings for logprobs."""
from __future__ import annotations

import asyncio
import reprlib
import time
from collections.abc import AsyncIterator

from nanovllm.entrypoints.openai.metrics import ServerMetrics
from nanovllm.entrypoints.openai.protocol import SamplingFields
from nanovllm.outputs import StreamOutput
from nanovllm.sampling_params import BeamSearchParams, SamplingParams
from nanovllm.structured_outputs import StructuredOutputs

MAX_LOGPROBS = 20  # OpenAI's bound on logprobs / top_logprobs
MAX_N = 128
# Fields of OpenAI's and vLLM's APIs that change what a request returns and that nanovllm does not implement, with
# the values that mean "off" (clients send those explicitly): any other value is a 400, never served as if unset.
UNSUPPORTED_FIELDS = {
    "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "logits_processors": ([],), "priority": (0,),
}


def not_off(values: dict, table: dict) -> list[str]:
    """The fields of `values` that `table` lists, set to something other than None or one of the table's "off"
    values (compared with their type, so True is not 1)."""
    return [name for name, value in values.items() if name in table and value is not None
            and not any(value == off and type(value) is type(off) for off in table[name])]


class ModelNotFound(LookupError):
    pass


class OpenAIServing:
    def __init__(self, llm, model_name: str, metrics: ServerMetrics):
        """`llm` is an AsyncLLM; `model_name` is what clients name in `model`."""
        self.llm, self.model_name, self.metrics = llm, model_name, metrics
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.config.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ModelNotFound(f"The model `{model}` does not exist; this server serves `{self.model_name}`")

    def check_fields(self, request: SamplingFields) -> None:
        """The model, and ValueError for a field nanovllm does not implement set to anything but "off"."""
        self.check_model(request.model)
        extra = request.model_extra or {}
        for name in not_off(extra, UNSUPPORTED_FIELDS):
            raise ValueError(f"{name}={reprlib.repr(extra[name])} is not supported by nanovllm; leave it unset")
        if request.stream_options is not None and not request.stream:
            raise ValueError("stream_options is only allowed with stream=true")

    def token_ids(self, prompt, index: int = 0, truncate: int | None = None) -> list[int]:
        """A prompt (text or token ids) as checked token ids, the way LLM.generate checks them (errors name it
        prompts[index]); `truncate`: vLLM's truncate_prompt_tokens, the last that many tokens, kept before the
        length check."""
        params = SamplingParams(truncate_prompt_tokens=truncate) if truncate is not None else None
        return self.llm.check_request(prompt, params, index)[0]

    async def run(self, prompt_ids: list[int], params: SamplingParams, request_id: str, stream: bool,
                  prompt_logprobs: int | None = None) -> AsyncIterator[StreamOutput]:
        """generate_async with the metrics of each of its `params.n` samples (a choice each) recorded when the
        request ends (finished or aborted)."""
        arrival = time.monotonic()
        num_output, last = [0] * params.n, [None] * params.n
        try:
            async for out in self.llm.generate_async(prompt_ids, params, request_id, stream=stream,
                                                     prompt_logprobs=prompt_logprobs):
                num_output[out.sample_index] += len(out.token_ids)
                last[out.sample_index] = out
                yield out
        finally:
            for i, (count, out) in enumerate(zip(num_output, last)):  # the n samples share one prompt (one prefill)
                self.metrics.record(arrival, out.first_token_time if out else None, len(prompt_ids) if i == 0 else 0,
                                    count, out.finish_reason if out and out.finished else "abort")

    async def run_beam_search(self, prompt_ids: list[int], params: BeamSearchParams, request_id: str):
        """AsyncLLM.beam_search's RequestOutput (its outputs: the beams, best first), with each beam recorded in the
        metrics as a choice."""
        arrival, out = time.monotonic(), None
        try:
            async for out in self.llm.beam_search(prompt_ids, request_id, params):
                pass
            return out
        finally:
            for i, beam in enumerate(out.outputs if out is not None else [None]):
                self.metrics.record(arrival, None, len(prompt_ids) if i == 0 else 0,
                                    len(beam.token_ids) if beam else 0, beam.finish_reason if beam else "abort")

    def prompt_logprobs_body(self, entries: list | None, as_ids: bool = False) -> list | None:
        """vLLM's prompt_logprobs in a response: per prompt token None (the first) or {token: {"logprob", "rank",
        "decoded_token"}} (the top N, then the prompt token)."""
        if entries is None:
            return None
        return [None if step is None else
                {str(t): {"logprob": float(lp), "rank": lp.rank, "decoded_token": self.token_text(t, as_ids)}
                 for t, lp in step.items()} for step in entries]

    def token_text(self, token_id: int, as_id: bool = False) -> str:
        """A token as logprobs name it: its text, or vLLM's "token_id:{id}" (return_tokens_as_token_ids: exact
        even for tokens whose text alone is ambiguous or not valid UTF-8)."""
        return f"token_id:{token_id}" if as_id else self.tokenizer.decode([token_id])


def check_prompt_logprobs(request: SamplingFields) -> int | None:
    """vLLM's prompt_logprobs field: N in [0, 20], not with stream (ValueError naming it)."""
    n = request.prompt_logprobs
    if n is None:
        return None
    if not 0 <= n <= MAX_LOGPROBS:
        raise ValueError(f"prompt_logprobs={n} is invalid: expected an integer in [0, {MAX_LOGPROBS}]")
    if request.stream:
        raise ValueError("prompt_logprobs are not returned when streaming: set stream=false")
    if request.use_beam_search:
        raise ValueError("prompt_logprobs are not returned with use_beam_search: leave prompt_logprobs unset")
    return n


def to_sampling_params(request: SamplingFields, max_tokens: int, logprobs: int | None, seed_offset: int = 0,
                       n: int = 1, logprobs_name: str = "logprobs") -> SamplingParams:
    """The request's sampling fields as SamplingParams; ValueError (HTTP 400) names any invalid one.

    Choice j of a request with `seed` and n > 1 uses seed + j, so the n choices differ and each is reproducible:
    as one engine request with `n` samples (sample j is seeded seed + j, and the samples share the prompt's KV
    blocks) or, where each choice needs its own request (echoed prompt logprobs), with `seed_offset` j.
    """
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise ValueError(f"{logprobs_name}={logprobs} is invalid: expected an integer in [0, {MAX_LOGPROBS}]")
    seed = SamplingParams(seed=request.seed).sample_seed(seed_offset)  # seed + j, wrapped into the seed range
    # temperature, top_p, top_k, min_p and repetition_penalty left unset take the model's generation_config.json
    return SamplingParams(
        temperature=request.temperature, top_p=request.top_p, top_k=request.top_k, min_p=request.min_p,
        repetition_penalty=request.repetition_penalty,
        presence_penalty=request.presence_penalty or 0.0, frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=request.logit_bias or None, allowed_token_ids=request.allowed_token_ids,
        bad_words=request.bad_words or None, structured=structured_outputs(request),
        seed=seed, n=n, max_tokens=max_tokens, min_tokens=request.min_tokens, ignore_eos=request.ignore_eos,
        stop=request.stop or None, stop_token_ids=request.stop_token_ids, logprobs=logprobs,
        include_stop_str_in_output=request.include_stop_str_in_output, skip_special_tokens=request.skip_special_tokens,
        truncate_prompt_tokens=request.truncate_prompt_tokens)


# sampling fields beam search has no use for, with their "off" values (clients send those explicitly): set to
# anything else they are a 400, never ignored
NOT_FOR_BEAM_SEARCH = {
    "top_p": (1.0,), "top_k": (0, -1), "min_p": (0.0,), "seed": (), "stop": ("", []), "stop_token_ids": ([],),
    "min_tokens": (0,), "presence_penalty": (0.0,), "frequency_penalty": (0.0,), "logit_bias": ({},),
    "repetition_penalty": (1.0,), "allowed_token_ids": (), "bad_words": ([],), "response_format": ({"type": "text"},),
    "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (), "structured_outputs": (),
}


def beam_search_params(request: SamplingFields, max_tokens: int, logprobs) -> BeamSearchParams:
    """vLLM's use_beam_search: the request's n choices are its n best beams (temperature, ignore_eos, length_penalty
    and include_stop_str_in_output as BeamSearchParams takes them). Streaming, logprobs and the sampling fields beam
    search does not use are refused (ValueError naming them)."""
    if request.stream:
        raise ValueError("use_beam_search does not stream: set stream=false")
    if logprobs is not None and logprobs is not False:  # completions' logprobs=0 asks for the sampled tokens' too
        raise ValueError("logprobs are not returned with use_beam_search: leave logprobs unset")
    given = not_off({name: getattr(request, name) for name in NOT_FOR_BEAM_SEARCH}, NOT_FOR_BEAM_SEARCH)
    if given:
        raise ValueError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to use_beam_search "
                         f"(beams are ranked by log-probability): leave {'it' if len(given) == 1 else 'them'} unset")
    return BeamSearchParams(beam_width=request.n, max_tokens=max_tokens, ignore_eos=request.ignore_eos,
                            temperature=request.temperature or 0.0, length_penalty=request.length_penalty,
                            include_stop_str_in_output=request.include_stop_str_in_output)


def structured_outputs(request: SamplingFields) -> dict | StructuredOutputs | None:
    """OpenAI's response_format, vLLM's structured_outputs, or its older guided_json / guided_regex / guided_choice /
    guided_grammar, as SamplingParams.structured (None when the request sets none; ValueError when it sets several)."""
    given = {kind: value for kind, value in (("json", request.guided_json), ("regex", request.guided_regex),
                                             ("choice", request.guided_choice), ("grammar", request.guided_grammar))
             if value is not None}
    if request.structured_outputs is not None:
        given["structured_outputs"] = StructuredOutputs.coerce(request.structured_outputs, "structured_outputs")
    fmt = request.response_format
    if fmt is not None and fmt.get("type") not in (None, "text"):
        if fmt.get("type") == "json_object":
            given["json_object"] = True
        elif fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise ValueError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
            given["json"] = schema
        else:
            raise ValueError(f"response_format type {fmt.get('type')!r} is invalid: expected 'text', 'json_object' "
                             f"or 'json_schema'")
    if len(given) > 1:
        raise ValueError(f"response_format, structured_outputs and guided_* set {len(given)} constraints "
                         f"({', '.join(given)}); give one")
    if "structured_outputs" in given:
        return given["structured_outputs"]
    return given or None


def check_n(n: int) -> None:
    if not 1 <= n <= MAX_N:
        raise ValueError(f"n={n} is invalid: expected an integer in [1, {MAX_N}]")


def check_max_tokens(max_tokens: int | None, name: str = "max_tokens") -> None:
    if max_tokens is not None and (isinstance(max_tokens, bool) or max_tokens < 1):
        raise ValueError(f"{name}={max_tokens} is invalid: expected an integer >= 1")


def check_context_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                         name: str = "max_tokens") -> None:
    """vLLM's rule: an explicit max_tokens must fit beside the prompt in max_model_len (400, not a silent cut)."""
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise ValueError(f"{name}={max_tokens} is invalid: this model's maximum context length is {max_model_len} "
                         f"tokens, and the request asks for {num_prompt_tokens + max_tokens} ({num_prompt_tokens} "
                         f"in the prompt, {max_tokens} to generate); reduce the prompt or {name}")


async def merge(streams: list[AsyncIterator], first_choice: list[int] | None = None
                ) -> AsyncIterator[tuple[int, object]]:
    """(i, item) from several async iterators as items come; if the consumer stops, the others are closed (their
    requests aborted). With `first_choice`, stream k yields StreamOutput pieces of choices first_choice[k] +
    sample_index (a request with n samples serves n choices) and i is that choice's index."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except BaseException as e:  # delivered to the consumer, which re-raises it
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield (i if first_choice is None else first_choice[i] + item.sample_index), item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
