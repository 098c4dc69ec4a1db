"""The server's event loop relays every stream: a request's CPU-heavy preparation (tokenizing a long prompt,
rendering a chat template, compiling a grammar) runs in a worker thread, never on the loop, so one large request
does not stall every other client's stream (measured before: a 3.6M-character prompt held all streams 1.8 s)."""
import asyncio
import threading

import pytest

from nanovllm import AsyncLLM, LLM
from nanovllm.entrypoints.openai.metrics import ServerMetrics
from nanovllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from nanovllm.entrypoints.openai.serving_completions import OpenAIServingCompletion
from nanovllm.entrypoints.openai.serving_tokens import OpenAIServingTokens


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    llm = AsyncLLM(llm=LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=64, max_model_len=128))
    yield llm
    llm.close()


def test_request_preparation_runs_off_the_event_loop(llm, monkeypatch):
    threads = []
    for name in ("encode", "apply_chat_template"):
        def recording(*args, _call=getattr(llm.tokenizer, name), **kwargs):
            threads.append(threading.current_thread())
            return _call(*args, **kwargs)
        monkeypatch.setattr(llm.tokenizer, name, recording)
    metrics = ServerMetrics(llm.engine, "tiny")
    completions, tokens = OpenAIServingCompletion(llm, "tiny", metrics), OpenAIServingTokens(llm, "tiny", metrics)
    messages = [{"role": "user", "content": "hi"}]

    async def run():
        loop_thread = threading.current_thread()
        await completions.create(CompletionRequest(prompt=["a", "b"], max_tokens=2))
        await tokens.create(ChatCompletionRequest(messages=messages, max_tokens=2))
        await tokens.tokenize_async(TokenizeRequest(messages=messages))
        return loop_thread
    loop_thread = asyncio.run(run())
    assert len(threads) >= 6 and loop_thread not in threads  # 2 prompts, 2 x (template + encode)


def test_add_special_tokens_reaches_the_tokenizer(llm, monkeypatch):
    """vLLM's add_special_tokens (completions: default true; chat: default false) was ignored: a Llama client
    sending an already templated prompt with add_special_tokens=false got a second BOS."""
    encode = llm.tokenizer.encode

    def with_bos(text, add_special_tokens=True, **kwargs):  # a tokenizer that adds a BOS (id 5), as Llama's does
        return ([5] if add_special_tokens else []) + encode(text, add_special_tokens=False, **kwargs)
    monkeypatch.setattr(llm.tokenizer, "encode", with_bos)
    metrics = ServerMetrics(llm.engine, "tiny")
    completions, chat = OpenAIServingCompletion(llm, "tiny", metrics), OpenAIServingTokens(llm, "tiny", metrics)
    messages = [{"role": "user", "content": "hi"}]
    plain = encode("hello", add_special_tokens=False)
    for flag, expected in ((None, [5] + plain), (True, [5] + plain), (False, plain)):
        extra = {} if flag is None else {"add_special_tokens": flag}
        prompts, jobs, _ = completions.plan(CompletionRequest(prompt="hello", max_tokens=2, **extra))
        assert prompts[0][1] == expected and jobs[0][2] == expected
    templated = chat.plan(ChatCompletionRequest(messages=messages, max_tokens=2))[0]  # default: no BOS added
    assert chat.plan(ChatCompletionRequest(messages=messages, max_tokens=2, add_special_tokens=True))[0] == \
        [5] + templated
