"""The OpenAI wire format: request bodies as pydantic models (unknown fields ignored), response shapes as helpers.

Only shapes live here; what the values mean (and their validation) belongs to SamplingParams, reached through
serving_engine.to_sampling_params.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients (LangChain, lm-eval) send fields we do not use


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class SamplingFields(OpenAIModel):
    """The fields completions and chat completions share. Unknown fields are kept (`model_extra`) so that the
    serving code can refuse the OpenAI / vLLM features nanovllm does not implement (serving_engine)."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    repetition_penalty: float | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    response_format: dict | None = None  # {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict | None = None  # vLLM >= 0.11's name: {"json" | "regex" | "choice" | ...: ...}
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens
    use_beam_search: bool = False  # vLLM's: the n choices are the n best beams (LLM.beam_search)
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:{id}", not their text
    prompt_logprobs: int | None = None  # vLLM's: every prompt token's logprob and rank, and the top N
    length_penalty: float = 1.0  # vLLM's, for use_beam_search


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM's: false for a prompt that already holds its BOS


class ContentPart(OpenAIModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIModel):
    role: str
    content: str | list[ContentPart] | None = None


class ChatTemplateFields(OpenAIModel):
    """vLLM's chat-template options (shared by chat completions and /tokenize)."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # a Jinja template replacing the tokenizer's for this request


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    model_config = SamplingFields.model_config
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_special_tokens: bool = False  # vLLM's: the chat template already writes the special tokens
    echo: bool = False  # vLLM's: the reply starts with the last message's content when that is the assistant's


class TokenizeRequest(ChatTemplateFields):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


def error_body(message: str, kind: str = "BadRequestError", code: int = 400, param: str | None = None) -> dict:
    """The OpenAI error shape (with vLLM's `type` names)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None,
                      stop_reason: int | str | None = None) -> dict:
    """A completion choice; `stop_reason` (vLLM's extension) names the stop string or stop token id that ended it."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def completion_response(request_id: str, model: str, choices: list[dict], usage_: dict | None,
                        created: int, obj: Literal["text_completion"] = "text_completion") -> dict:
    body = {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def chat_response(request_id: str, model: str, choices: list[dict], usage_: dict | None, created: int,
                  chunk: bool = False) -> dict:
    body = {"id": request_id, "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": created, "model": model, "choices": choices}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def sse(data: dict | str) -> str:
    """One server-sent event: `data: {...}` and a blank line."""
    import json
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
