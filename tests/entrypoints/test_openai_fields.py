"""Request fields a vLLM or OpenAI client sends that go beyond the basics: vLLM's current `structured_outputs`, chat
template options, and the fields nanovllm does not implement (each a 400 naming it, never silently ignored)."""
import json
import re
import shutil

import httpx
import pytest

from tests.entrypoints.server import ServerProcess

ENGINE = ["--backend", "cpu_ref", "--num-kvcache-blocks", "64", "--kvcache-block-size", "16",
          "--max-model-len", "128", "--max-num-seqs", "8"]
MESSAGES = [{"role": "user", "content": "hi"}]


# the tiny model's template, plus the check many models' templates make (Llama 2, Mistral, Gemma)
STRICT_TEMPLATE = """{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
<|im_start|>{{ m['role'] }}
{{ m['content'] }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    model = tmp_path_factory.mktemp("strict") / "model"
    shutil.copytree(tiny_qwen3, model)
    (model / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    server = ServerProcess(str(model), *ENGINE, "--served-model-name", "tiny", "--shutdown-timeout", "3")
    yield server
    assert server.stop() == 0, server.output()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_structured_outputs_constrains_the_output(server, path):
    """vLLM >= 0.11 sends `structured_outputs` (its guided_* fields are gone): it must constrain, not be ignored."""
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": MESSAGES}
    for seed in range(3):
        for constraint, ok in (({"choice": ["left", "right"]}, lambda t: t in ("left", "right")),
                               ({"regex": "[0-9]{3}"}, lambda t: re.fullmatch("[0-9]{3}", t)),
                               ({"json": {"type": "object", "properties": {"a": {"type": "boolean"}},
                                          "required": ["a"], "additionalProperties": False}, "backend": "xgrammar"},
                                lambda t: json.loads(t) in ({"a": True}, {"a": False}))):
            response = post(server, path, {**body, "max_tokens": 12, "seed": seed, "structured_outputs": constraint})
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            text = choice["text"] if "text" in choice else choice["message"]["content"]
            assert ok(text), (constraint, text)


@pytest.mark.parametrize("path, extra, field", [
    ("/v1/completions", {"structured_outputs": {"choice": ["a"]}, "guided_regex": "b"}, "2 constraints"),
    ("/v1/completions", {"structured_outputs": {"structural_tag": "{}"}}, "structural_tag"),
    ("/v1/completions", {"structured_outputs": {}}, "structured"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"echo": "maybe"}, "echo"),
    ("/v1/chat/completions", {"chat_template": "{% for m in messages %}"}, "chat_template"),
    ("/v1/chat/completions", {"chat_template": ""}, "chat_template"),
    ("/v1/completions", {"use_beam_search": True, "stream": True}, "use_beam_search does not stream"),
    ("/v1/completions", {"use_beam_search": True, "top_p": 0.5, "seed": 3}, "top_p, seed do not apply"),
    ("/v1/completions", {"use_beam_search": True, "logprobs": 2}, "logprobs"),
    ("/v1/completions", {"use_beam_search": True, "logprobs": 0}, "logprobs"),
    ("/v1/chat/completions", {"use_beam_search": True, "logprobs": True}, "logprobs"),
    ("/v1/completions", {"use_beam_search": True, "echo": True}, "echo"),
    ("/v1/completions", {"use_beam_search": True, "length_penalty": "huge"}, "length_penalty"),
    ("/v1/completions", {"include_stop_str_in_output": "maybe"}, "include_stop_str_in_output"),
    ("/v1/completions", {"prompt_logprobs": 21}, "prompt_logprobs=21 is invalid"),
    ("/v1/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs are not returned when streaming"),
    ("/v1/chat/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/completions", {"prompt_logprobs": 1, "echo": True, "logprobs": 1}, "prompt_logprobs and echo"),
    ("/v1/completions", {"return_tokens_as_token_ids": "maybe"}, "return_tokens_as_token_ids"),
    ("/v1/completions", {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/v1/chat/completions", {"truncate_prompt_tokens": -1}, "truncate_prompt_tokens"),
    ("/v1/completions", {"logits_processors": ["x"]}, "logits_processors"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_unsupported_fields_get_400_naming_them(server, path, extra, field):
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": MESSAGES}
    response = post(server, path, {**body, "max_tokens": 2, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert field in error["message"] and error["type"] == "BadRequestError"


def test_neutral_values_of_unsupported_fields_are_accepted(server):
    """Clients (LangChain, vLLM's own benchmarks) send the defaults explicitly: those are not refused."""
    neutral = {"tools": [], "tool_choice": "none", "use_beam_search": False, "include_stop_str_in_output": False,
               "skip_special_tokens": True, "prompt_logprobs": None, "echo": False, "chat_template": None,
               "parallel_tool_calls": False, "stream_options": None}
    response = post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, **neutral})
    assert response.status_code == 200, response.text


def test_chat_template_options_reach_the_template(server):
    """continue_final_message continues the last (assistant) message; chat_template_kwargs are the template's
    variables; both count in /tokenize as in /v1/chat/completions."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the capital"}]
    plain = post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()["tokens"]
    continued = post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False,
                                           "continue_final_message": True}).json()["tokens"]
    detok = post(server, "/detokenize", {"tokens": continued}).json()["prompt"]
    assert detok.endswith("the capital") and len(continued) < len(plain)
    body = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 2}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] == len(continued)
    both = post(server, "/v1/chat/completions", {**body, "add_generation_prompt": True})
    assert both.status_code == 400 and "continue_final_message" in both.json()["error"]["message"]
    # chat_template_kwargs are the template's variables and win over the request's own fields, as in vLLM (the tiny
    # model's template reads add_generation_prompt); keys the server sets itself are refused
    prompted = post(server, "/tokenize", {"messages": MESSAGES}).json()["tokens"]
    kwargs = post(server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False,
                                        "chat_template_kwargs": {"add_generation_prompt": True}})
    assert kwargs.json()["tokens"] == prompted
    chat = post(server, "/v1/chat/completions", {"messages": MESSAGES, "add_generation_prompt": False, "max_tokens": 1,
                                                 "chat_template_kwargs": {"add_generation_prompt": True}})
    assert chat.json()["usage"]["prompt_tokens"] == len(prompted)
    reserved = post(server, "/tokenize", {"messages": MESSAGES, "chat_template_kwargs": {"tokenize": True}})
    assert reserved.status_code == 400 and "tokenize" in reserved.json()["error"]["message"]


PLAIN_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"


def test_a_requests_chat_template_replaces_the_models(server, tiny_qwen3):
    """vLLM's per-request `chat_template`: /tokenize and /v1/chat/completions render with it (the model's strict
    template would refuse two user turns in a row; this one does not)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    want = tokenizer.encode("[user] a\n[user] b\n[assistant]", add_special_tokens=False)
    tokens = post(server, "/tokenize", {"messages": messages, "chat_template": PLAIN_TEMPLATE,
                                        "add_special_tokens": False})
    assert tokens.status_code == 200 and tokens.json()["tokens"] == want, tokens.text
    chat = post(server, "/v1/chat/completions", {"messages": messages, "chat_template": PLAIN_TEMPLATE,
                                                 "max_tokens": 2})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == len(want), chat.text


def test_serve_chat_template_option(tiny_qwen3, tmp_path):
    """`nanovllm serve --chat-template FILE` (or the template inline) replaces the tokenizer's for every request; a
    missing file stops the command before the model loads."""
    from transformers import AutoTokenizer
    (tmp_path / "plain.jinja").write_text(PLAIN_TEMPLATE)
    server = ServerProcess(tiny_qwen3, *ENGINE, "--chat-template", str(tmp_path / "plain.jinja"))
    try:
        tokens = post(server, "/tokenize", {"messages": MESSAGES, "add_special_tokens": False}).json()["tokens"]
        assert tokens == AutoTokenizer.from_pretrained(tiny_qwen3).encode("[user] hi\n[assistant]",
                                                                          add_special_tokens=False)
    finally:
        assert server.stop() == 0, server.output()
    from nanovllm.chat_template import load_chat_template
    with pytest.raises(ValueError, match="no such file"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        load_chat_template("{% if %}")
    assert load_chat_template(PLAIN_TEMPLATE) == PLAIN_TEMPLATE


def test_use_beam_search_returns_the_n_best_beams(server, tiny_qwen3):
    """vLLM's use_beam_search: the n choices are LLM.beam_search's n best beams (output text only), per prompt;
    the chat endpoint's choices too."""
    from nanovllm import LLM, BeamSearchParams
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42]]
    response = post(server, "/v1/completions", {"prompt": prompts, "n": 3, "max_tokens": 4, "use_beam_search": True,
                                                "length_penalty": 0.5})
    assert response.status_code == 200, response.text
    body = response.json()
    llm = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=64, kvcache_block_size=16, max_model_len=128)
    want = llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=4, length_penalty=0.5))
    expected = [llm.tokenizer.decode(beam.tokens[len(p):]) for p, out in zip(prompts, want) for beam in out.sequences]
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert [c["text"] for c in body["choices"]] == expected
    assert body["usage"]["prompt_tokens"] == 8 and body["usage"]["completion_tokens"] == sum(
        len(beam.tokens) - len(p) for p, out in zip(prompts, want) for beam in out.sequences)
    neutral = {"top_p": 1, "top_k": -1, "min_p": 0, "presence_penalty": 0, "frequency_penalty": 0,
               "repetition_penalty": 1, "min_tokens": 0, "stop": [], "logit_bias": {}, "seed": None}
    chat = post(server, "/v1/chat/completions", {"messages": MESSAGES, "n": 2, "max_tokens": 3,
                                                 "use_beam_search": True, **neutral})  # what clients send as "off"
    assert chat.status_code == 200, chat.text
    assert len(chat.json()["choices"]) == 2 and all(c["message"]["content"] for c in chat.json()["choices"])


def test_a_beam_search_whose_client_gives_up_frees_its_requests(server):
    """Cancelled mid-search (the client times out), the beams' one-token requests are aborted and their blocks freed;
    the beam request is counted as aborted."""
    aborted = server.metrics().get('nanovllm:request_success_total{finished_reason="abort",model_name="tiny"}', 0)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/completions", timeout=0.5,
                   json={"prompt": [5, 6, 7], "n": 8, "max_tokens": 120, "use_beam_search": True, "ignore_eos": True})
    m = server.wait_idle()
    assert m["nanovllm:kv_cache_blocks_used"] == 0 and m["nanovllm:num_requests_running"] == 0
    assert m['nanovllm:request_success_total{finished_reason="abort",model_name="tiny"}'] - aborted == 1


def test_return_tokens_as_token_ids(server, tiny_qwen3):
    """vLLM's return_tokens_as_token_ids: logprobs name each token "token_id:{id}" (completions' tokens and
    top_logprobs keys, streamed or not, with text_offset still counting text; chat's token and top_logprobs)."""
    from transformers import AutoTokenizer
    decode = AutoTokenizer.from_pretrained(tiny_qwen3).decode

    def as_text(name: str) -> str:
        assert name.startswith("token_id:"), name
        return decode([int(name.removeprefix("token_id:"))])
    body = {"prompt": "hello", "max_tokens": 5, "temperature": 0, "logprobs": 2}
    plain = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    for stream in (False, True):
        if stream:
            with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                              json={**body, "return_tokens_as_token_ids": True, "stream": True}) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            pieces = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
            ids = {k: sum((p[k] for p in pieces), []) for k in ("tokens", "top_logprobs", "text_offset")}
        else:
            ids = post(server, "/v1/completions", {**body, "return_tokens_as_token_ids": True}).json()
            ids = ids["choices"][0]["logprobs"]
        assert [as_text(t) for t in ids["tokens"]] == plain["tokens"]
        assert [{as_text(k): v for k, v in top.items()} for top in ids["top_logprobs"]] == plain["top_logprobs"]
        assert ids["text_offset"] == plain["text_offset"]
    chat = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    want = post(server, "/v1/chat/completions", chat).json()["choices"][0]["logprobs"]["content"]
    got = post(server, "/v1/chat/completions", {**chat, "return_tokens_as_token_ids": True}).json()
    got = got["choices"][0]["logprobs"]["content"]
    assert [as_text(e["token"]) for e in got] == [e["token"] for e in want]
    assert [[as_text(t["token"]) for t in e["top_logprobs"]] for e in got] == \
        [[t["token"] for t in e["top_logprobs"]] for e in want]


def test_chat_echo_prepends_the_assistants_last_message(server):
    """vLLM's chat `echo`: when the conversation ends with the assistant's message (continued with
    continue_final_message), the reply starts with it, streamed or not; after a user's message nothing changes."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the capital"}]
    body = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 4,
            "temperature": 0}
    plain = post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    echoed = post(server, "/v1/chat/completions", {**body, "echo": True}).json()["choices"][0]["message"]["content"]
    assert echoed == "the capital" + plain
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "echo": True, "stream": True},
                      timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == echoed
    user_last = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    assert post(server, "/v1/chat/completions", {**user_last, "echo": True}).json()["choices"][0]["message"] == \
        post(server, "/v1/chat/completions", user_last).json()["choices"][0]["message"]


def test_prompt_logprobs_as_vllm_returns_them(server, tiny_qwen3):
    """vLLM's prompt_logprobs: per completion choice (each of a prompt's n choices), and once for a chat response,
    a list with None for the first prompt token, then {token id: {logprob, rank, decoded_token}}: the top N, then
    the prompt token; equal to LLM.generate's prompt_logprobs."""
    from nanovllm import LLM, SamplingParams
    prompt = [5, 6, 7, 8, 9, 10]
    body = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "n": 2, "prompt_logprobs": 2}).json()
    llm = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=64, kvcache_block_size=16, max_model_len=128)
    want = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    want = want["prompt_logprobs"]
    for choice in body["choices"]:
        got = choice["prompt_logprobs"]
        assert got[0] is None and len(got) == len(prompt) == len(want)
        for token, step, ref in zip(prompt[1:], got[1:], want[1:]):
            assert [int(t) for t in step] == list(ref) and str(token) in step
            for t, entry in step.items():
                assert entry["logprob"] == pytest.approx(ref[int(t)], abs=1e-5) and entry["rank"] == ref[int(t)].rank
                assert entry["decoded_token"] == llm.tokenizer.decode([int(t)])
    assert "prompt_logprobs" not in post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1}).json()[
        "choices"][0]
    chat = post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "prompt_logprobs": 0}).json()
    tokens = post(server, "/tokenize", {"messages": MESSAGES}).json()["tokens"]
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == len(tokens)
    assert [list(step) for step in chat["prompt_logprobs"][1:]] == [[str(t)] for t in tokens[1:]]


def test_a_template_that_refuses_the_conversation_is_a_400(server):
    body = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "max_tokens": 2}
    for path in ("/v1/chat/completions", "/tokenize"):
        response = post(server, path, body)
        assert response.status_code == 400, response.text
        assert "roles must alternate" in response.json()["error"]["message"]
    assert post(server, "/v1/chat/completions", {**body, "messages": body["messages"][:1]}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_truncate_prompt_tokens_keeps_the_prompts_end(server, path):
    """vLLM's truncate_prompt_tokens: a prompt longer than max_model_len (128) is served from its last k tokens,
    before the context-length check; usage counts the tokens kept."""
    if path == "/v1/completions":
        ids = [(7 * i) % 500 + 1 for i in range(200)]
        body, short = {"prompt": ids}, {"prompt": ids[-20:]}
    else:
        body = short = {"messages": [{"role": "user", "content": "word " * 150}]}
    assert post(server, path, {**body, "max_tokens": 2}).status_code == 400  # too long without truncation
    response = post(server, path, {**body, "max_tokens": 2, "temperature": 0, "truncate_prompt_tokens": 20})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 20
    if path == "/v1/completions":  # the same as sending the last 20 ids
        want = post(server, path, {**short, "max_tokens": 2, "temperature": 0}).json()
        assert response.json()["choices"][0]["text"] == want["choices"][0]["text"]
