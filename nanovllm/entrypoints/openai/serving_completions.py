"""POST /v1/completions: prompts (text, token ids, or lists of either) x n choices, streamed or not, with legacy
logprobs (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) and `echo` (with logprobs, the prompt's too:
what lm-eval's `local-completions` reads for log-likelihoods)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from nanovllm.entrypoints.openai.protocol import (CompletionRequest, completion_choice, completion_response, new_id,
                                                  now, sse, usage)
from nanovllm.entrypoints.openai.serving_engine import (OpenAIServing, beam_search_params, check_context_length,
                                                        check_max_tokens, check_n, check_prompt_logprobs, merge,
                                                        to_sampling_params)
from nanovllm.requests import is_token_id
from nanovllm.text import check_text


class OpenAIServingCompletion(OpenAIServing):
    def prompts(self, prompt, add_special_tokens: bool = True, truncate: int | None = None
                ) -> list[tuple[str | None, list[int]]]:
        """(text or None, token ids) per prompt of the request (each its last `truncate` tokens, when set)."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and is_token_id(prompt[0])):
            prompt = [prompt]
        if not prompt:
            raise ValueError("prompt is empty: give a string, a list of strings, token ids or lists of token ids")
        out = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                check_text(f"prompts[{i}]", p)
                out.append((p, self.token_ids(self.tokenizer.encode(p, add_special_tokens=add_special_tokens), i,
                                                  truncate)))
            else:
                out.append((None, self.token_ids(p, i, truncate)))
        return out

    def plan(self, request: CompletionRequest):
        """Every (prompt, params) of the request, checked in full before anything runs."""
        self.check_fields(request)
        check_n(request.n)
        if request.suffix:
            raise ValueError("suffix is not supported by nanovllm; leave it unset")
        if request.best_of is not None and request.best_of != request.n:
            raise ValueError(f"best_of={request.best_of} is not supported: leave it unset or equal to n")
        echo_only = request.max_tokens == 0
        if echo_only and not request.echo:
            raise ValueError("max_tokens=0 is invalid without echo=true: expected an integer >= 1")
        if not echo_only:
            check_max_tokens(request.max_tokens)
        prompts = self.prompts(request.prompt, request.add_special_tokens, request.truncate_prompt_tokens)
        if check_prompt_logprobs(request) is not None and request.echo and request.logprobs is not None:
            raise ValueError("prompt_logprobs and echo with logprobs both return the prompt's logprobs: give one")
        if request.use_beam_search:  # one search per prompt, its n best beams the prompt's n choices
            if request.echo:
                raise ValueError("echo is not supported with use_beam_search: leave it unset")
            jobs = []
            for p, (text, ids) in enumerate(prompts):
                check_context_length(len(ids), request.max_tokens, self.max_model_len)
                max_tokens = request.max_tokens or max(1, self.max_model_len - len(ids))
                jobs.append((p * request.n, text, ids, beam_search_params(request, max_tokens, request.logprobs)))
            return prompts, jobs, False
        # one engine request per prompt, its n samples the prompt's n choices; with echoed prompt logprobs one per
        # choice (a request's prompt logprobs come with its first sample only)
        per_choice = request.echo and request.logprobs is not None and request.n > 1
        jobs = []  # (first choice index, text, ids, params)
        for p, (text, ids) in enumerate(prompts):
            if not echo_only:
                check_context_length(len(ids), request.max_tokens, self.max_model_len)
            max_tokens = 1 if echo_only else request.max_tokens or max(1, self.max_model_len - len(ids))
            for j in range(request.n if per_choice else 1):
                params = to_sampling_params(request, max_tokens, request.logprobs, j, 1 if per_choice else request.n)
                self.llm.check_request(ids, params)
                jobs.append((p * request.n + j, text, ids, params))
        return prompts, jobs, echo_only

    async def create(self, request: CompletionRequest) -> dict | AsyncIterator[str]:
        # in a worker thread: tokenizing long prompts (and compiling grammars) would stall every stream
        prompts, jobs, echo_only = await asyncio.to_thread(self.plan, request)
        request_id = new_id("cmpl")
        if request.use_beam_search:
            return await self.create_beam_search(request, request_id, jobs)
        prompt_logprobs = request.logprobs if request.echo and request.logprobs is not None else \
            request.prompt_logprobs
        streams = [self.run(ids, params, f"{request_id}-{k}", request.stream, prompt_logprobs)
                   for k, (_, _, ids, params) in enumerate(jobs)]
        first_choice = [job[0] for job in jobs]
        choice_prompts = [(text, ids) for text, ids in prompts for _ in range(request.n)]  # per choice index
        num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        if request.stream:
            return self.stream(request, request_id, choice_prompts, streams, first_choice, echo_only,
                               num_prompt_tokens)
        finals = [None] * len(choice_prompts)
        async for i, out in merge(streams, first_choice):
            finals[i] = out
        choices = []
        for i, ((text, ids), out) in enumerate(zip(choice_prompts, finals)):
            choice_text, logprobs, _ = self.choice_output(request, text, ids, out, echo_only, offset=0)
            choices.append(completion_choice(i, choice_text, logprobs, out.finish_reason, out.stop_reason))
            if request.prompt_logprobs is not None:  # a prompt's n choices are one request: its first sample's
                first = finals[i - i % request.n]
                choices[-1]["prompt_logprobs"] = self.prompt_logprobs_body(first.prompt_logprobs,
                                                                           request.return_tokens_as_token_ids)
        num_output = 0 if echo_only else sum(len(o.token_ids) for o in finals)
        return completion_response(request_id, self.model_name, choices, usage(num_prompt_tokens, num_output), now())

    async def create_beam_search(self, request: CompletionRequest, request_id: str, jobs) -> dict:
        """use_beam_search: the searches of all prompts at once; choice p * n + j is prompt p's j-th best beam."""
        outs = await asyncio.gather(*(self.run_beam_search(ids, params, f"{request_id}-{k}")
                                      for k, (_, _, ids, params) in enumerate(jobs)))
        choices = [completion_choice(first + j, beam.text, None, beam.finish_reason)
                   for (first, *_), out in zip(jobs, outs) for j, beam in enumerate(out.outputs)]
        num_prompt = sum(len(ids) for _, _, ids, _ in jobs)
        num_output = sum(len(beam.token_ids) for out in outs for beam in out.outputs)
        return completion_response(request_id, self.model_name, choices, usage(num_prompt, num_output), now())

    def choice_output(self, request, prompt_text, prompt_ids, out, echo_only: bool, offset: int,
                      first: bool = True) -> tuple[str, dict | None, int]:
        """The text and legacy logprobs one output piece adds to a choice (the echoed prompt before the first), and
        the text offset after it (`offset` when there are no logprobs)."""
        text, token_ids, entries = "", [], []
        if request.echo and first:
            text = prompt_text if prompt_text is not None else self.tokenizer.decode(prompt_ids)
            token_ids += prompt_ids
            entries += out.prompt_logprobs or [None] * len(prompt_ids)
        if not echo_only:
            text += out.text
            token_ids += out.token_ids
            entries += out.logprobs or [None] * len(out.token_ids)
        if request.logprobs is None:
            return text, None, offset
        return text, *self.legacy_logprobs(token_ids, entries, offset, request.return_tokens_as_token_ids)

    def legacy_logprobs(self, token_ids: list[int], entries: list[dict | None], offset: int,
                        as_ids: bool = False) -> tuple[dict, int]:
        """The legacy logprobs of these tokens, and the text offset after them. `text_offset` counts the tokens'
        text, whatever `as_ids` shows them as."""
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for token_id, entry in zip(token_ids, entries):
            token = self.token_text(token_id)
            tokens.append(self.token_text(token_id, True) if as_ids else token)
            text_offset.append(offset)
            offset += len(token)
            token_logprobs.append(None if entry is None else entry[token_id])
            top_logprobs.append(None if entry is None else {self.token_text(t, as_ids): lp for t, lp in entry.items()})
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}, offset

    async def stream(self, request, request_id, choice_prompts, streams, first_choice, echo_only,
                     num_prompt_tokens) -> AsyncIterator[str]:
        created = now()
        include_usage = request.stream_options is not None and request.stream_options.include_usage
        started, offsets, num_output = [False] * len(choice_prompts), [0] * len(choice_prompts), 0
        try:
            async for i, out in merge(streams, first_choice):
                text, ids = choice_prompts[i]
                piece, logprobs, offsets[i] = self.choice_output(request, text, ids, out, echo_only, offsets[i],
                                                                 not started[i])
                started[i] = True
                num_output += len(out.token_ids)
                if piece or logprobs or out.finished:
                    choice = completion_choice(i, piece, logprobs, out.finish_reason if out.finished else None,
                                               out.stop_reason)  # None until the last piece
                    body = completion_response(request_id, self.model_name, [choice], None, created)
                    if include_usage:
                        body["usage"] = None
                    yield sse(body)
            if include_usage:
                yield sse(completion_response(request_id, self.model_name, [],
                                              usage(num_prompt_tokens, 0 if echo_only else num_output), created))
        except (ValueError, RuntimeError) as e:
            yield sse({"error": {"message": str(e), "type": type(e).__name__, "param": None, "code": 500}})
        yield sse("[DONE]")
