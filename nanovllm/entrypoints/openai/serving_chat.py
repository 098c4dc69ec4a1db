"""POST /v1/chat/completions: `messages` through the tokenizer's chat template, n choices, streamed `delta`s or a
whole message, `finish_reason`, `usage` (and `stream_options.include_usage`), logprobs in the chat format."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from nanovllm.chat_template import content_text, render, template_kwargs
from nanovllm.entrypoints.openai.protocol import (ChatCompletionRequest, ChatMessage, ChatTemplateFields,
                                                  chat_response, new_id, now, sse, usage)
from nanovllm.entrypoints.openai.serving_engine import (OpenAIServing, beam_search_params, check_context_length,
                                                        check_max_tokens, check_n, check_prompt_logprobs, merge,
                                                        to_sampling_params)
from nanovllm.sampling_params import SamplingParams
from nanovllm.text import check_text


def message_text(i: int, message: ChatMessage) -> str:
    """A message's content as one string (OpenAI's text parts joined, as LLM.chat joins them)."""
    content = message.content
    if content is None:
        return ""
    parts = content if isinstance(content, str) else [part.model_dump() for part in content]
    return content_text(f"messages[{i}].content", parts)


def echoed_text(request: ChatCompletionRequest) -> str:
    """vLLM's chat `echo`: the last message's content when it is the assistant's (the reply continues it, as with
    continue_final_message), else nothing."""
    last = request.messages[-1]
    return message_text(len(request.messages) - 1, last) if request.echo and last.role == "assistant" else ""


class OpenAIServingChat(OpenAIServing):
    def prompt_ids(self, messages: list[ChatMessage], options: ChatTemplateFields,
                   add_special_tokens: bool = False, truncate: int | None = None) -> list[int]:
        conversation = [{"role": m.role, "content": message_text(i, m)} for i, m in enumerate(messages)]
        for i, m in enumerate(conversation):
            check_text(f"messages[{i}].role", m["role"])
            check_text(f"messages[{i}].content", m["content"])
        kwargs = template_kwargs(options.add_generation_prompt, options.continue_final_message,
                                 options.chat_template_kwargs)
        text = render(self.tokenizer, conversation, kwargs, options.chat_template)
        return self.token_ids(self.tokenizer.encode(text, add_special_tokens=add_special_tokens), 0, truncate)

    def plan(self, request: ChatCompletionRequest) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids and the params, checked in full before anything runs (in a worker thread: the
        chat template and the tokenizer take CPU time the event loop needs for every stream)."""
        self.check_fields(request)
        check_n(request.n)
        max_tokens = request.max_completion_tokens or request.max_tokens
        check_max_tokens(request.max_completion_tokens, "max_completion_tokens")
        check_max_tokens(request.max_tokens)
        if request.top_logprobs is not None and not request.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        ids = self.prompt_ids(request.messages, request, request.add_special_tokens, request.truncate_prompt_tokens)
        check_context_length(len(ids), max_tokens, self.max_model_len,
                             "max_completion_tokens" if request.max_completion_tokens else "max_tokens")
        max_tokens = max_tokens or max(1, self.max_model_len - len(ids))
        check_prompt_logprobs(request)
        if request.use_beam_search:
            return ids, beam_search_params(request, max_tokens, request.logprobs)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = to_sampling_params(request, max_tokens, logprobs, n=request.n,  # the n choices: one request
                                    logprobs_name="top_logprobs")
        self.llm.check_request(ids, params)
        return ids, params

    async def create(self, request: ChatCompletionRequest) -> dict | AsyncIterator[str]:
        ids, params = await asyncio.to_thread(self.plan, request)
        request_id = new_id("chatcmpl")
        echo = echoed_text(request)
        if request.use_beam_search:  # the n choices are the n best beams
            out = await self.run_beam_search(ids, params, request_id)
            choices = [{"index": j, "message": {"role": "assistant", "content": echo + beam.text}, "logprobs": None,
                        "finish_reason": beam.finish_reason, "stop_reason": None} for j, beam in enumerate(out.outputs)]
            return chat_response(request_id, self.model_name, choices,
                                 usage(len(ids), sum(len(b.token_ids) for b in out.outputs)), now())
        streams = [self.run(ids, params, request_id, request.stream, request.prompt_logprobs)]
        if request.stream:
            return self.stream(request, request_id, streams, len(ids), echo)
        finals = [None] * request.n
        async for j, out in merge(streams, [0]):
            finals[j] = out
        choices = [{"index": j, "message": {"role": "assistant", "content": echo + out.text},
                    "logprobs": self.chat_logprobs(out, request) if request.logprobs else None,
                    "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
                   for j, out in enumerate(finals)]
        body = chat_response(request_id, self.model_name, choices,
                             usage(len(ids), sum(len(o.token_ids) for o in finals)), now())
        if request.prompt_logprobs is not None:  # vLLM's: the response's, the prompt being one for every choice
            body["prompt_logprobs"] = self.prompt_logprobs_body(finals[0].prompt_logprobs,
                                                                request.return_tokens_as_token_ids)
        return body

    def chat_logprobs(self, out, request: ChatCompletionRequest) -> dict:
        n = request.top_logprobs or 0
        content = []
        for token_id, entry in zip(out.token_ids, out.logprobs or []):
            top = list(entry.items())[:n]
            content.append({**self.token_entry(token_id, entry[token_id], request.return_tokens_as_token_ids),
                            "top_logprobs": [self.token_entry(t, lp, request.return_tokens_as_token_ids)
                                             for t, lp in top]})
        return {"content": content}

    def token_entry(self, token_id: int, logprob: float, as_id: bool = False) -> dict:
        token = self.token_text(token_id, as_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    async def stream(self, request, request_id, streams, num_prompt_tokens, echo: str = "") -> AsyncIterator[str]:
        created = now()
        include_usage = request.stream_options is not None and request.stream_options.include_usage

        def chunk(choices: list[dict], usage_=None) -> str:
            body = chat_response(request_id, self.model_name, choices, usage_, created, chunk=True)
            if include_usage and usage_ is None:
                body["usage"] = None
            return sse(body)

        for j in range(request.n):
            yield chunk([{"index": j, "delta": {"role": "assistant", "content": echo}, "logprobs": None,
                          "finish_reason": None, "stop_reason": None}])
        num_output = 0
        try:
            async for j, out in merge(streams, [0]):
                num_output += len(out.token_ids)
                if out.text or out.finished or (request.logprobs and out.token_ids):
                    yield chunk([{"index": j, "delta": {"content": out.text} if out.text else {},
                                  "logprobs": self.chat_logprobs(out, request) if request.logprobs else None,
                                  "finish_reason": out.finish_reason if out.finished else None,
                                  "stop_reason": out.stop_reason}])  # None until the last piece
            if include_usage:
                yield chunk([], usage(num_prompt_tokens, num_output))
        except (ValueError, RuntimeError) as e:
            yield sse({"error": {"message": str(e), "type": type(e).__name__, "param": None, "code": 500}})
        yield sse("[DONE]")
