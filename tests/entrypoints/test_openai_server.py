"""`nanovllm serve` as a subprocess on a loopback port, driven by the official `openai` client: the results equal
LLM.generate / LLM.chat on the same model; 64 concurrent streams finish; a client killed mid-stream frees its
blocks; bad requests get 400s; the API key is enforced; SIGTERM shuts down with exit code 0."""
import asyncio
import json
import math
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from nanovllm import LLM, SamplingParams
from tests.entrypoints.server import ServerProcess

API_KEY = "test-key"
ENGINE = ["--backend", "cpu_ref", "--num-kvcache-blocks", "256", "--kvcache-block-size", "16",
          "--max-model-len", "256", "--max-num-seqs", "64"]
OPTIONS = dict(backend="cpu_ref", num_kvcache_blocks=256, kvcache_block_size=16, max_model_len=256,
               max_num_seqs=64)
PROMPTS = ["paris is the capital of", "hello world", "the quick brown fox"]


@pytest.fixture(scope="module")
def server(tiny_qwen3):
    server = ServerProcess(tiny_qwen3, *ENGINE, "--served-model-name", "tiny", "--shutdown-timeout", "3",
                           api_key=API_KEY)
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, **OPTIONS)


def post(server, path: str, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, timeout=60,
                      headers={"Content-Type": "application/json", **server.headers, **(headers or {})})


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=7)])
def test_completions_equal_generate(client, llm, sampling):
    expected = llm.generate(PROMPTS, SamplingParams(max_tokens=12, **sampling), use_tqdm=False)
    response = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=12, **sampling)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == [e["text"] for e in expected]
    assert [c.finish_reason for c in response.choices] == [e["finish_reason"] for e in expected]
    assert response.usage.completion_tokens == sum(len(e["token_ids"]) for e in expected)
    assert response.usage.prompt_tokens == sum(len(e["prompt_token_ids"]) for e in expected)
    streamed = [""] * len(PROMPTS)
    reasons = [None] * len(PROMPTS)
    for chunk in client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=12, stream=True, **sampling):
        for c in chunk.choices:
            streamed[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert streamed == [e["text"] for e in expected]
    assert reasons == [e["finish_reason"] for e in expected]


def test_penalties_logit_bias_and_structured_output_reach_the_engine(client, llm):
    params = dict(temperature=0.8, seed=3, presence_penalty=0.7, frequency_penalty=0.4, logit_bias={"42": 5.0})
    expected = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=10, **params), use_tqdm=False)[0]
    response = client.completions.create(model="tiny", prompt=PROMPTS[:1], max_tokens=10, **params)
    assert response.choices[0].text == expected["text"]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "json please"}], max_tokens=30, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    assert json.loads(chat.choices[0].message.content) in ({"ok": True}, {"ok": False})
    choice = client.completions.create(model="tiny", prompt="x", max_tokens=5, seed=2,
                                       extra_body={"guided_choice": ["left", "right"]})
    assert choice.choices[0].text in ("left", "right")


def test_completions_token_prompts_n_stop_and_logprobs(client, llm):
    ids = llm.tokenizer.encode(PROMPTS[0])
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True)
    expected = llm.generate([ids], params, use_tqdm=False)[0]
    response = client.completions.create(model="tiny", prompt=[ids, ids], max_tokens=8, temperature=0, logprobs=2,
                                         extra_body={"ignore_eos": True})
    for choice in response.choices:
        assert choice.text == expected["text"]
        lp = choice.logprobs
        assert len(lp.token_logprobs) == 8 and len(lp.top_logprobs) == 8 and lp.text_offset[0] == 0
        for got, want, token_id in zip(lp.token_logprobs, expected["logprobs"], expected["token_ids"]):
            assert math.isclose(got, want[token_id], abs_tol=1e-4)
    seeded = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, n=3, seed=5,
                                       temperature=1.0)
    assert [c.index for c in seeded.choices] == [0, 1, 2]
    assert seeded.choices[0].text == llm.generate([PROMPTS[1]], SamplingParams(max_tokens=6, seed=5),
                                                  use_tqdm=False)[0]["text"]
    stop = expected["text"][3:5]
    stopped = client.completions.create(model="tiny", prompt=[ids], max_tokens=8, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text
    # vLLM's stop_reason: the stop string that ended a choice, None when max_tokens did; in streams on the last chunk
    assert stopped.choices[0].stop_reason == stop and response.choices[0].stop_reason is None
    chunks = list(client.completions.create(model="tiny", prompt=[ids], max_tokens=8, temperature=0, stop=[stop],
                                            stream=True, extra_body={"ignore_eos": True}))
    assert [c.choices[0].stop_reason for c in chunks if c.choices] == [None] * (len(chunks) - 1) + [stop]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    chat_text = chat.choices[0].message.content
    assert chat.choices[0].stop_reason is None and chat.choices[0].finish_reason == "length"
    chat_stop = chat_text[2:4]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=8, temperature=0, stop=chat_stop, extra_body={"ignore_eos": True})
    assert (chat.choices[0].finish_reason, chat.choices[0].stop_reason) == ("stop", chat_stop)
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}],
                                                 max_tokens=8, temperature=0, stop=chat_stop, stream=True,
                                                 extra_body={"ignore_eos": True}))
    assert [c.choices[0].stop_reason for c in chunks] == [None] * (len(chunks) - 1) + [chat_stop]
    stop_id = expected["token_ids"][2]  # a stop token id: an int stop_reason
    by_id = client.completions.create(model="tiny", prompt=[ids], max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]})
    assert (by_id.choices[0].finish_reason, by_id.choices[0].stop_reason) == ("stop", stop_id)
    kept = client.completions.create(model="tiny", prompt=[ids], max_tokens=8, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == stopped.choices[0].text + stop  # vLLM's include_stop_str_in_output
    eos = llm.tokenizer.eos_token_id
    special = client.completions.create(model="tiny", prompt=[ids], max_tokens=2, temperature=0,
                                        logit_bias={str(eos): 100}, extra_body={"ignore_eos": True,
                                                                                "skip_special_tokens": False})
    assert special.choices[0].text == llm.tokenizer.eos_token * 2


def test_echo_with_logprobs_scores_the_prompt(client, llm):
    """The prompt's logprob at its last position equals what generate reports for sampling that token."""
    ids = llm.tokenizer.encode(PROMPTS[2])
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=1), use_tqdm=False)[0]
    token = out["token_ids"][0]
    for max_tokens in (0, 1):
        echoed = client.completions.create(model="tiny", prompt=[ids + [token]], max_tokens=max_tokens, echo=True,
                                           logprobs=1, temperature=0).choices[0]
        lp = echoed.logprobs
        assert len(lp.tokens) == len(ids) + 1 + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert math.isclose(lp.token_logprobs[len(ids)], out["logprobs"][0][token], abs_tol=1e-4)
        assert echoed.text.startswith(llm.tokenizer.decode(ids + [token]))
    # n > 1 with echoed logprobs: every choice scores the prompt (one engine request per choice)
    choices = client.completions.create(model="tiny", prompt=[ids + [token]], max_tokens=1, echo=True, logprobs=1,
                                        temperature=0, n=2).choices
    assert [c.index for c in choices] == [0, 1]
    for c in choices:
        assert math.isclose(c.logprobs.token_logprobs[len(ids)], out["logprobs"][0][token], abs_tol=1e-4)


def test_chat_equals_llm_chat(client, llm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=10, logprobs=2), use_tqdm=False)[0]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                              logprobs=True, top_logprobs=2)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected["text"]
    assert choice.finish_reason == expected["finish_reason"]
    assert response.usage.prompt_tokens == len(expected["prompt_token_ids"])
    assert response.usage.completion_tokens == len(expected["token_ids"])
    entries = choice.logprobs.content
    assert len(entries) == len(expected["token_ids"]) and all(len(e.top_logprobs) == 2 for e in entries)
    assert math.isclose(entries[0].logprob, expected["logprobs"][0][expected["token_ids"][0]], abs_tol=1e-4)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected["token_ids"])


def test_n_chat_choices_share_the_prompt_and_equal_seeded_generates(server, client, llm):
    """n choices are one engine request whose samples share the prompt's KV blocks (prefix-cache hits for all but
    the first), and choice j equals a generate seeded with seed + j, streamed or not."""
    messages = [{"role": "user", "content": " ".join(["the quick brown fox jumps over the lazy dog"] * 8)}]
    before = server.metrics()
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, n=4, seed=9,
                                              temperature=1.0)
    after = server.metrics()
    full_blocks = (response.usage.prompt_tokens - 1) // 16
    assert full_blocks >= 4
    hits = after["nanovllm:prefix_cache_hits"] - before["nanovllm:prefix_cache_hits"]
    assert hits >= 3 * full_blocks * 16
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    for j, choice in enumerate(response.choices):
        expected = llm.chat(messages, SamplingParams(max_tokens=6, seed=9 + j, temperature=1.0), use_tqdm=False)[0]
        assert choice.message.content == expected["text"]
    streamed = [""] * 4
    for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, n=4, seed=9,
                                                temperature=1.0, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == [c.message.content for c in response.choices]


def test_64_concurrent_streams_finish(server, llm):
    prompts = [f"{PROMPTS[i % 3]} {i}" for i in range(64)]
    expected = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=120, max_retries=0)

        async def one(prompt: str) -> str:
            text = ""
            async for chunk in await client.completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                                               temperature=0, stream=True,
                                                               extra_body={"ignore_eos": True}):
                text += chunk.choices[0].text
            return text

        try:
            return await asyncio.wait_for(asyncio.gather(*map(one, prompts)), 180)
        finally:
            await client.close()

    assert asyncio.run(run()) == [e["text"] for e in expected]
    assert server.wait_idle()["nanovllm:kv_cache_blocks_used"] == 0


ABORTED = 'nanovllm:request_success_total{finished_reason="abort",model_name="tiny"}'
KILLED_CLIENT = """
import sys, httpx
body = {"model": "tiny", "prompt": "hello", "max_tokens": 250, "n": 64, "stream": True, "ignore_eos": True}
with httpx.stream("POST", sys.argv[1] + "/v1/completions", json=body, headers={"Authorization": "Bearer test-key"},
                  timeout=60) as r:
    for line in r.iter_lines():
        if line.startswith("data: {"):
            print("first chunk", flush=True)
            break
    import time; time.sleep(60)
"""


def test_a_client_killed_mid_stream_frees_its_blocks(server):
    """64 choices of 250 tokens: far from done when the client dies, so they end aborted, not by length."""
    aborted = server.metrics().get(ABORTED, 0)
    client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server.url], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "first chunk"
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait(10)
    m = server.wait_idle()
    assert m["nanovllm:kv_cache_blocks_used"] == 0 and m["nanovllm:num_requests_running"] == 0
    assert m[ABORTED] - aborted == 64


def test_a_non_streaming_client_that_gives_up_frees_its_blocks(server):
    aborted = server.metrics().get(ABORTED, 0)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=0.5,
                   json={"model": "tiny", "prompt": "hello", "max_tokens": 250, "ignore_eos": True, "n": 64})
    m = server.wait_idle()
    assert m["nanovllm:kv_cache_blocks_used"] == 0 and m["nanovllm:num_requests_running"] == 0
    assert m[ABORTED] - aborted == 64


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 2}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "seed": "x"}, "seed"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompts[1] is empty"),
    ("/v1/completions", {"prompt": [[1], [2], [10**6]]}, "prompts[2] has token id"),
    ("/v1/completions", {"prompt": ["a", "b", ""]}, "prompts[2] is empty"),
    ("/v1/completions", {"prompt": [10**6]}, "vocabulary"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**6]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 300}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
     "json_schema"),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "(["}, "regex"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", "{not json", "JSON"),
    ("/v1/completions", {"prompt": "x " * 400}, "max_model_len"),
    ("/v1/completions", {"prompt": "x " * 100, "max_tokens": 200}, "maximum context length is 256"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 300},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs=21"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image_url"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one"),
    ("/detokenize", {"tokens": [-1]}, "vocabulary"),
    ("/tokenize", {"prompt": "a\ud800"}, "unpaired surrogate"),
    ("/v1/completions", {"prompt": "hi", "bad_words": ["\ud800"]}, "unpaired surrogate"),
    ("/v1/chat/completions", {"messages": [{"role": "user\ud800", "content": "x"}]}, "unpaired surrogate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x\ud800"}]}, "unpaired surrogate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "unpaired surrogate"),
])
def test_bad_requests_get_400_naming_the_problem(server, path, body, field):
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert field.lower() in error["message"].lower() and error["type"] == "BadRequestError"


def test_unknown_fields_are_ignored_and_unknown_models_are_404(server):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "langchain_extra": {"x": 1}, "user": "u", "foo": 1}
    assert post(server, "/v1/completions", body).status_code == 200
    response = post(server, "/v1/completions", {**body, "model": "gpt-4"})
    assert response.status_code == 404 and "gpt-4" in response.json()["error"]["message"]


def test_api_key_is_enforced(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10)
        assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200
    import importlib.metadata  # vLLM's GET /version, open like /health
    assert httpx.get(f"{server.url}/version", timeout=10).json() == {"version": importlib.metadata.version("nanovllm")}


def test_models_tokenize_detokenize_and_metrics(server, client, llm):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    ids = post(server, "/tokenize", {"prompt": PROMPTS[0]}).json()
    assert ids["tokens"] == llm.tokenizer.encode(PROMPTS[0]) and ids["count"] == len(ids["tokens"])
    assert post(server, "/detokenize", {"tokens": ids["tokens"]}).json()["prompt"] == PROMPTS[0]
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hello"}]}).json()
    assert chat["tokens"] == llm.apply_chat_template([{"role": "user", "content": "hello"}])[0]
    m = server.metrics()
    for name in ("nanovllm:num_requests_running", "nanovllm:num_requests_waiting", "nanovllm:kv_cache_blocks_used",
                 "nanovllm:prompt_tokens_total", "nanovllm:generation_tokens_total",
                 "nanovllm:time_to_first_token_seconds_count", "nanovllm:time_per_output_token_seconds_count"):
        assert name in m, name
    assert m["nanovllm:generation_tokens_total"] > 0 and m["nanovllm:time_to_first_token_seconds_count"] > 0


def test_metrics_count_a_prompt_once_whatever_n(server, client, llm):
    """n choices share one prompt (its blocks, one prefill): prompt_tokens grows by the prompt's length once, while
    generation_tokens counts every choice's tokens."""
    before = server.metrics()
    response = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3, n=3, seed=1)
    after = server.metrics()
    grown = after["nanovllm:prompt_tokens_total"] - before.get("nanovllm:prompt_tokens_total", 0)
    assert grown == response.usage.prompt_tokens == len(llm.tokenizer.encode(PROMPTS[0]))
    generated = after["nanovllm:generation_tokens_total"] - before.get("nanovllm:generation_tokens_total", 0)
    assert generated == response.usage.completion_tokens


LOGLIKELIHOOD_TASK = [  # (context, continuation): a small log-likelihood task of our own
    ("paris is the capital of", " france"), ("the quick brown fox jumps over the", " lazy dog"),
    ("hello", " world!"), ("numbers 0 1 2 3", " 4 5 6"), ("a small engine runs large models fast on a", " gpu"),
    ("unicode: café", " naïve 東京"), ("the", " capital of paris is the quick brown fox"), ("1", " 2"),
]


def test_lm_eval_local_completions_matches_hf(server, tiny_qwen3, monkeypatch):
    """lm-eval's `local-completions` model (echo + logprobs through /v1/completions) gives the per-example
    log-likelihoods and greedy flags that lm-eval's `hf` model computes with transformers on the same checkpoint."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(LOGLIKELIHOOD_TASK)]
    hf = HFLM(pretrained=tiny_qwen3, device="cpu", dtype="float32", batch_size=4).loglikelihood(requests)
    api = LocalCompletionsAPI(model="tiny", base_url=f"{server.url}/v1/completions", tokenizer=tiny_qwen3,
                              tokenizer_backend="huggingface", batch_size=3, max_retries=1, timeout=60)
    served = api.loglikelihood(requests)
    assert len(served) == len(hf) == len(LOGLIKELIHOOD_TASK)
    for (got, got_greedy), (want, want_greedy) in zip(served, hf):
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-4), (got, want)
        assert got_greedy == want_greedy


def test_sigterm_mid_stream_exits_0(server):
    """Last in this module (it stops the shared server): in-flight streams end, the process exits 0."""
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 240, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:  # the stream ends when it finishes or when the grace period is over
            for _ in lines:
                pass
        except httpx.HTTPError:
            pass
    assert server.process.wait(30) == 0, server.output()
    assert time.monotonic() - start < 30
